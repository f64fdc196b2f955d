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
  - {name: grpc, containerPort: {{ $cfg.gateway.grpc_port }}}
  - {name: node-agent, containerPort: {{ $cfg.tiers.node_agent_port }}}
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

{{/* Ray Serve's config (platform/serve/lull.yaml) with the ports, GPUs and build_app args of the values. */}}
{{- define "lull.serveConfig" -}}
{{- $serve := .Files.Get "files/serve/lull.yaml" | fromYaml -}}
{{- $cfg := .Values.config -}}
{{- $workers := .Values.ray.gpuWorkers -}}
{{- $_ := set $serve.http_options "port" ($cfg.gateway.http_port | int) -}}
{{- $app := index $serve.applications 0 -}}
{{- $_ := set $app.runtime_env.env_vars "PROMETHEUS_MULTIPROC_DIR" $cfg.telemetry.metrics_dir -}}
{{- /* build_app's PlatformSettings: the engine count's bounds, and the GPU worker group's
nodes so Lull's autoscaling policy caps the count at the replicas they hold. */ -}}
{{- $args := $app.args | default dict -}}
{{- $_ := set $args "replicas" ($cfg.replicas.initial | int) -}}
{{- $_ := set $args "min_replicas" ($cfg.replicas.min | int) -}}
{{- $_ := set $args "max_replicas" ($cfg.replicas.max | int) -}}
{{- $_ := set $args "gpus_per_replica" ($cfg.engine.tensor_parallel_size | int) -}}
{{- $_ := set $args "gpus_per_pod" ($workers.gpusPerPod | int) -}}
{{- with $workers.nodeSelector -}}
{{- $labels := list -}}
{{- range $key := keys . | sortAlpha -}}
{{- $labels = append $labels (printf "%s=%s" $key (index $workers.nodeSelector $key)) -}}
{{- end -}}
{{- $_ := set $args "gpu_node_selector" (join "," $labels) -}}
{{- end -}}
{{- $_ := set $app "args" $args -}}
{{- range $app.deployments -}}
{{- if eq .name "LullEngine" -}}
{{- /* An engine replica reserves all its tensor-parallel GPUs for vLLM's workers. */ -}}
{{- $_ := set .ray_actor_options "num_gpus" ($cfg.engine.tensor_parallel_size | int) -}}
{{- end -}}
{{- end -}}
{{- toYaml $serve -}}
{{- end -}}
