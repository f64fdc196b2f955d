{{/* The Lull container of a Ray pod. Call with (dict "root" $ "role" "head"|"gateway"|"worker"). */}}
{{- define "lull.rayContainer" -}}
{{- $ := .root -}}
{{- $cfg := $.Values.config -}}
name: {{ printf "ray-%s" .role }}
image: {{ include "lull.image" $ }}
imagePullPolicy: {{ $.Values.image.pullPolicy }}
env:
  - name: LULL_CONFIG
    value: /etc/lull/config.yaml
  # The pod's own address: Ray's dashboard (head) listens there, not on every interface.
  - name: LULL_POD_IP
    valueFrom:
      fieldRef:
        fieldPath: status.podIP
  - name: LULL_INTERNAL_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "lull.internalTokenSecret" $ }}
        key: internal-token
  - name: PROMETHEUS_MULTIPROC_DIR
    value: {{ $cfg.telemetry.metrics_dir | quote }}
  - name: OTEL_SERVICE_NAME
    value: {{ printf "lull-%s" .role | quote }}
  {{- if $.Values.tracing.otlpEndpoint }}
  - name: OTEL_EXPORTER_OTLP_ENDPOINT
    value: {{ $.Values.tracing.otlpEndpoint | quote }}
  - name: OTEL_EXPORTER_OTLP_PROTOCOL
    value: {{ $.Values.tracing.protocol | quote }}
  - name: OTEL_TRACES_SAMPLER
    value: parentbased_traceidratio
  - name: OTEL_TRACES_SAMPLER_ARG
    value: {{ $.Values.tracing.sampleRatio | quote }}
  {{- end }}
  {{- if or $.Values.redis.enabled $.Values.redis.auth.existingSecret }}
  - name: LULL_REDIS_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "lull.redisSecret" $ }}
        key: redis-password
  {{- end }}
  {{- with $.Values.ray.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  {{- if eq .role "head" }}
  - {name: gcs-server, containerPort: 6379}
  - {name: dashboard, containerPort: 8265}
  - {name: client, containerPort: 10001}
  {{- end }}
  - {name: serve, containerPort: {{ $cfg.gateway.http_port }}}
  {{- if and $cfg.gateway.grpc_port (eq .role "gateway") }}
  - {name: grpc, containerPort: {{ $cfg.gateway.grpc_port }}}
  {{- end }}
  {{- if $cfg.tiers.node_agent_port }}
  - {name: node-agent, containerPort: {{ $cfg.tiers.node_agent_port }}}
  {{- end }}
  - {name: lull-metrics, containerPort: {{ $cfg.telemetry.metrics_port }}}
  - {name: metrics, containerPort: {{ $.Values.ray.metricsExportPort }}}
{{- include "lull.probes" . }}
securityContext:
  {{- include "lull.containerSecurityContext" (dict "readOnlyRoot" true) | nindent 2 }}
volumeMounts:
  {{- include "lull.scratchMounts" . | nindent 2 }}
  - name: lull-config
    mountPath: /etc/lull/config.yaml
    subPath: config.yaml
  - name: lull-metrics
    mountPath: {{ $cfg.telemetry.metrics_dir }}
  {{- if $cfg.auth.api_keys_file }}
  - name: api-keys
    mountPath: {{ dir $cfg.auth.api_keys_file }}
    readOnly: true
  {{- end }}
  {{- if eq .role "worker" }}
  - name: dshm
    mountPath: /dev/shm
  {{- end }}
  {{- include "lull.modelMounts" (dict "root" $ "readOnly" true) | nindent 2 }}
  {{- with $.Values.ray.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Probes: what matters on each pod. The head is ready when its raylet and GCS answer,
never later: KubeRay deploys the Serve app only once the head is ready, and the app
starts the gateways and node agents, so a head that waited for them would wait forever.
A gateway pod is ready when its gateway's gRPC listener (or, without gRPC, the gateway
behind the pod's HTTP proxy) answers: only then does the gateway Service send it
clients. A GPU worker is ready when its node agent answers. Every pod is alive while
its raylet answers (the head: while the GCS does). */}}
{{- define "lull.probes" -}}
{{- $ := .root -}}
{{- $cfg := $.Values.config -}}
{{- $raylet := dict "httpGet" (dict "path" "/api/local_raylet_healthz" "port" 52365) -}}
{{- $gcs := dict "httpGet" (dict "path" "/api/gcs_healthz" "port" 8265) -}}
{{- $alive := ternary $gcs $raylet (eq .role "head") -}}
{{- $ready := $raylet -}}
{{- if eq .role "head" -}}
{{- $ready = $gcs -}}
{{- else if eq .role "gateway" -}}
{{- $ready = ternary (dict "tcpSocket" (dict "port" "grpc")) (dict "httpGet" (dict "path" "/health" "port" "serve")) (gt ($cfg.gateway.grpc_port | int) 0) -}}
{{- else if $cfg.tiers.node_agent_port -}}
{{- $ready = dict "tcpSocket" (dict "port" "node-agent") -}}
{{- end }}
startupProbe:
  {{- toYaml (merge (dict "periodSeconds" 5 "timeoutSeconds" 3 "failureThreshold" 120) $raylet) | nindent 2 }}
livenessProbe:
  {{- toYaml (merge (dict "periodSeconds" 15 "timeoutSeconds" 5 "failureThreshold" 8) $alive) | nindent 2 }}
readinessProbe:
  {{- toYaml (merge (dict "periodSeconds" 10 "timeoutSeconds" 3 "failureThreshold" 3) $ready) | nindent 2 }}
{{- end -}}

{{/* The volumes those mounts need. Same arguments. */}}
{{- define "lull.rayVolumes" -}}
{{- $ := .root -}}
- name: lull-config
  configMap:
    name: {{ include "lull.fullname" $ }}-config
- name: lull-metrics
  emptyDir: {}
{{- if $.Values.config.auth.api_keys_file }}
- name: api-keys
  secret:
    secretName: {{ include "lull.apiKeysSecret" $ }}
    items:
      - key: api-keys
        path: {{ base $.Values.config.auth.api_keys_file }}
{{- end }}
{{- if eq .role "worker" }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $.Values.ray.gpuWorkers.shmSize }}
{{- end }}
{{- include "lull.modelVolumes" $ }}
{{- with $.Values.ray.extraVolumes }}
{{ toYaml . }}
{{- end }}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end -}}

{{/* Ray Serve's config (platform/serve/lull.yaml) with the values' ports, metrics dir and gateway count. The
engine count and what each replica asks of Ray come from the config (build_app reads it). */}}
{{- define "lull.serveConfig" -}}
{{- $serve := .Files.Get "files/serve/lull.yaml" | fromYaml -}}
{{- $cfg := .Values.config -}}
{{- $_ := set $serve.http_options "port" ($cfg.gateway.http_port | int) -}}
{{- $app := index $serve.applications 0 -}}
{{- range $app.deployments -}}
{{- if eq .name "LullGateway" -}}{{- $_ := set . "num_replicas" ($.Values.gateway.replicas | int) -}}{{- end -}}
{{- end -}}
{{- $_ := set $app.runtime_env.env_vars "PROMETHEUS_MULTIPROC_DIR" $cfg.telemetry.metrics_dir -}}
{{- toYaml $serve -}}
{{- end -}}


{{/* Where a container under a read-only root filesystem writes: /tmp (Ray's session
folder, compile caches) and $HOME (Hugging Face, vLLM and Triton caches). */}}
{{- define "lull.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/lull
{{- end -}}
