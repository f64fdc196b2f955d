{{/* The Lull container of a Ray pod. Call with (dict "root" $ "role" "head"|"worker"). */}}
{{- define "lull.rayContainer" -}}
{{- $ := .root -}}
{{- $cfg := $.Values.config -}}
name: {{ printf "ray-%s" .role }}
image: {{ include "lull.image" $ }}
imagePullPolicy: {{ $.Values.image.pullPolicy }}
env:
  - name: LULL_CONFIG
    value: /etc/lull/config.yaml
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
  {{- if $.Values.redis.enabled }}
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
  {{- if $cfg.gateway.grpc_port }}
  - {name: grpc, containerPort: {{ $cfg.gateway.grpc_port }}}
  {{- end }}
  {{- if $cfg.tiers.node_agent_port }}
  - {name: node-agent, containerPort: {{ $cfg.tiers.node_agent_port }}}
  {{- end }}
  - {name: lull-metrics, containerPort: {{ $cfg.telemetry.metrics_port }}}
  - {name: metrics, containerPort: {{ $.Values.ray.metricsExportPort }}}
volumeMounts:
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
{{- end -}}

{{/* Ray Serve's config (platform/serve/lull.yaml) with the values' ports and metrics dir. The
engine count and what each replica asks of Ray come from the config (build_app reads it). */}}
{{- define "lull.serveConfig" -}}
{{- $serve := .Files.Get "files/serve/lull.yaml" | fromYaml -}}
{{- $cfg := .Values.config -}}
{{- $_ := set $serve.http_options "port" ($cfg.gateway.http_port | int) -}}
{{- $app := index $serve.applications 0 -}}
{{- $_ := set $app.runtime_env.env_vars "PROMETHEUS_MULTIPROC_DIR" $cfg.telemetry.metrics_dir -}}
{{- toYaml $serve -}}
{{- end -}}
