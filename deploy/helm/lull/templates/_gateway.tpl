{{/* The gateway pods: a CPU worker group of gateway.replicas pods, each with one unit of
the Ray resource every gateway replica asks for (config.cluster.gateway_resource), so
that each pod runs exactly one gateway and its gRPC listener: the gateway Service
selects these pods only. Ray's autoscaler keeps the group at its fixed size. */}}
{{- define "lull.gatewayGroup" -}}
{{- $gw := .Values.gateway -}}
- groupName: gateway
  replicas: {{ $gw.replicas }}
  minReplicas: {{ $gw.replicas }}
  maxReplicas: {{ $gw.replicas }}
  rayStartParams:
    num-gpus: "0"
    resources: {{ printf "\"{\\\"%s\\\": 1}\"" (include "lull.gatewayResource" .) | quote }}
    metrics-export-port: {{ .Values.ray.metricsExportPort | quote }}
  template:
    metadata:
      labels:
        {{- include "lull.selectorLabels" . | nindent 8 }}
        app.kubernetes.io/component: ray-gateway
        lull/metrics: "true"
    spec:
      serviceAccountName: {{ include "lull.serviceAccountName" . }}
      automountServiceAccountToken: false  # gateways never call the Kubernetes API
      securityContext:
        {{- include "lull.podSecurityContext" . | nindent 8 }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "lull.modelInit" (dict "root" . "role" "gateway") }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - {{- include "lull.rayContainer" (dict "root" . "role" "gateway") | nindent 10 }}
          resources:
            {{- toYaml $gw.resources | nindent 12 }}
      volumes:
        {{- include "lull.rayVolumes" (dict "root" . "role" "gateway") | nindent 8 }}
      {{- with $gw.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $gw.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $gw.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{- define "lull.gatewayResource" -}}lull_gateway{{- end -}}
