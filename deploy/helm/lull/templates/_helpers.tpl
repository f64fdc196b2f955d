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

{{/* Redis maxmemory in MiB: given, or 1.1 x the shared tier's capacity. */}}
{{- define "lull.redisMaxmemoryMb" -}}
{{- if .Values.redis.maxmemoryMb -}}
{{- .Values.redis.maxmemoryMb | int -}}
{{- else -}}
{{- mulf .Values.config.tiers.shared_capacity_gib 1126.4 | ceil | int | max 64 -}}
{{- end -}}
{{- end -}}

{{/* Lull's config as every pod reads it: values.config with the chart's Redis, and the GPU
worker group's nodes and GPUs per pod, which Lull's autoscaling policy caps the count by. */}}
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
{{- $_ := set $config "cluster" $cluster -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Worker pods for N engine replicas: ceil(N x tensor_parallel_size / gpusPerPod). */}}
{{- define "lull.workerPods" -}}
{{- $gpus := mul (.replicas | int) .root.Values.config.engine.tensor_parallel_size -}}
{{- $perPod := .root.Values.ray.gpuWorkers.gpusPerPod | int -}}
{{- div (add $gpus (sub $perPod 1)) $perPod -}}
{{- end -}}
