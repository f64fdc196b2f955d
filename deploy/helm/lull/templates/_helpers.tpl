{{/* Names and labels shared by every template. */}}

{{- define "lull.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name; short enough for KubeRay's generated suffixes. */}}
{{- define "lull.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "lull.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "lull.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lull.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lull.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A label selector of this release's Ray pods (head, gateways, GPU workers). */}}
{{- define "lull.rayPods" -}}
matchLabels:
  {{- include "lull.selectorLabels" . | nindent 2 }}
matchExpressions:
  - {key: app.kubernetes.io/component, operator: In, values: [ray-head, ray-gateway, ray-gpu-worker]}
{{- end -}}

{{- define "lull.labels" -}}
{{ include "lull.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "lull.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "lull.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-controller" (include "lull.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lull.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "lull.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "lull.redisSecret" -}}
{{- default (printf "%s-redis-auth" (include "lull.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "lull.redisHost" -}}
{{- printf "%s-redis" (include "lull.fullname" .) -}}
{{- end -}}

{{- define "lull.gcsRedisHost" -}}
{{- printf "%s-gcs-redis" (include "lull.fullname" .) -}}
{{- end -}}

{{- define "lull.gcsRedisSecret" -}}
{{- default (printf "%s-gcs-redis-auth" (include "lull.fullname" .)) .Values.gcsFaultTolerance.redis.auth.existingSecret -}}
{{- end -}}

{{/* Redis maxmemory in MiB: given, or 1.1 x the shared tier's capacity. */}}
{{- define "lull.redisMaxmemoryMb" -}}
{{- if .Values.redis.maxmemoryMb -}}
{{- .Values.redis.maxmemoryMb | int -}}
{{- else -}}
{{- mulf .Values.config.tiers.shared_capacity_gib 1126.4 | ceil | int | max 64 -}}
{{- end -}}
{{- end -}}

{{/* A Kubernetes memory quantity (bytes, or with a unit Ki Mi Gi Ti k K M G T m) in GiB. */}}
{{- define "lull.gib" -}}
{{- $q := toString . -}}
{{- $unit := regexFind "([KMGT]i|[kKMGTm])$" $q -}}
{{- $per := dict "" (divf 1 1073741824) "Ki" (divf 1 1048576) "Mi" (divf 1 1024) "Gi" 1.0 "Ti" 1024.0 "k" (divf 1000 1073741824) "K" (divf 1000 1073741824) "M" (divf 1000000 1073741824) "G" (divf 1000000000 1073741824) "T" (divf 1000000000000 1073741824) "m" (divf 0.001 1073741824) -}}
{{- mulf (trimSuffix $unit $q | float64) (index $per $unit) -}}
{{- end -}}

{{/* The DRAM tier must fit the GPU workers' /dev/shm with headroom: the rule of
proto/tier_capacity.py (10% of the volume, at least 2 GiB, stay free). */}}
{{- define "lull.checkDramFit" -}}
{{- $capacity := .Values.config.tiers.dram_capacity_gib | float64 -}}
{{- $shm := include "lull.gib" .Values.ray.gpuWorkers.shmSize | float64 -}}
{{- $room := subf $shm (maxf 2.0 (mulf 0.1 $shm)) -}}
{{- if and (gt $capacity 0.0) (gt $capacity $room) -}}
{{- fail (printf "config.tiers.dram_capacity_gib (%g) does not fit ray.gpuWorkers.shmSize (%s), which must keep 10%% (at least 2 GiB) free for vLLM and NCCL: lower config.tiers.dram_capacity_gib to at most %.2f, or raise ray.gpuWorkers.shmSize to at least %dGi" $capacity (toString .Values.ray.gpuWorkers.shmSize) (divf (floor (mulf $room 100)) 100) (ceil (subf (maxf (addf $capacity 2.0) (divf $capacity 0.9)) 0.000000001) | int)) -}}
{{- end -}}
{{- with .Values.ray.gpuWorkers.resources.limits.memory -}}
{{- if ge $shm (include "lull.gib" . | float64) -}}
{{- fail (printf "ray.gpuWorkers.shmSize (%s) must be below the workers' memory limit (%s): the tmpfs counts against it" (toString $.Values.ray.gpuWorkers.shmSize) (toString .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Lull's config as every pod reads it: values.config with the chart's Redis, the GPU
worker group's nodes and GPUs per pod, which Lull's autoscaling policy caps the count by,
and the size of the memory volume the DRAM tier lives in. */}}
{{- define "lull.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- if .Values.redis.enabled -}}
{{- $_ := set $config.tiers "redis_url" (printf "redis://%s:6379/0" (include "lull.redisHost" .)) -}}
{{- end -}}
{{- $workers := .Values.ray.gpuWorkers -}}
{{- $cluster := $config.cluster | default dict -}}
{{- $_ := set $cluster "gpus_per_pod" ($workers.gpusPerPod | int) -}}
{{- with $workers.nodeSelector -}}
{{- $labels := list -}}
{{- range $key := keys . | sortAlpha -}}
{{- $labels = append $labels (printf "%s=%s" $key (index $workers.nodeSelector $key)) -}}
{{- end -}}
{{- $_ := set $cluster "gpu_node_selector" (join "," $labels) -}}
{{- end -}}
{{- $_ := set $cluster "gateway_resource" (include "lull.gatewayResource" .) -}}
{{- $_ := set $config "cluster" $cluster -}}
{{- $_ := set $config.tiers "dram_volume_gib" (include "lull.gib" $workers.shmSize | float64) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Worker pods for N engine replicas: ceil(N x tensor_parallel_size / gpusPerPod). */}}
{{- define "lull.workerPods" -}}
{{- $gpus := mul (.replicas | int) .root.Values.config.engine.tensor_parallel_size -}}
{{- $perPod := .root.Values.ray.gpuWorkers.gpusPerPod | int -}}
{{- div (add $gpus (sub $perPod 1)) $perPod -}}
{{- end -}}

{{- define "lull.rayAuthSecret" -}}
{{- default (printf "%s-ray-auth" (include "lull.fullname" .)) .Values.security.rayAuth.existingSecret -}}
{{- end -}}

{{- define "lull.internalTokenSecret" -}}
{{- default (printf "%s-internal-token" (include "lull.fullname" .)) .Values.security.internalToken.existingSecret -}}
{{- end -}}

{{/* Every pod's securityContext: never root, the image's lull user (platform/Dockerfile). */}}
{{- define "lull.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsUser }}
fsGroup: {{ .Values.security.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Every container's: no privilege, no capability, and a read-only root filesystem where
the container writes only to its volumes (readOnlyRoot false for one that may not). */}}
{{- define "lull.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .readOnlyRoot }}
capabilities:
  drop: [ALL]
{{- end -}}
