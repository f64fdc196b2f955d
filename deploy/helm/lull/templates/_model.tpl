{{/* config.model.path as proto/model_ref.py reads it (the config checks it in full at
start; the schema checks its outline): kind hf, pvc or local, and the folder engines load. */}}
{{- define "lull.model" -}}
{{- $path := .Values.config.model.path | default "" -}}
{{- if hasPrefix "hf://" $path -}}
{{- $parts := splitList "@" (trimPrefix "hf://" $path) -}}
{{- $revision := ternary (last $parts) "main" (eq (len $parts) 2) -}}
kind: hf
repo: {{ first $parts | quote }}
revision: {{ $revision | quote }}
dir: {{ printf "/models/hf/%s/%s" (first $parts) $revision | quote }}
{{- else if hasPrefix "pvc://" $path -}}
{{- $rest := trimSuffix "/" (trimPrefix "pvc://" $path) -}}
kind: pvc
claim: {{ first (splitList "/" $rest) | quote }}
dir: {{ printf "/models/pvc/%s" $rest | quote }}
{{- else -}}
kind: local
dir: {{ $path | quote }}
{{- end -}}
{{- end -}}

{{- define "lull.modelClaim" -}}
{{- default (printf "%s-models" (include "lull.fullname" .)) .Values.modelCache.existingClaim -}}
{{- end -}}

{{/* The model volume of every Ray pod: the cache hf:// models download into (a claim, or
an emptyDir per pod when there is none), or the pvc:// claim itself. */}}
{{- define "lull.modelVolumes" -}}
{{- $model := include "lull.model" . | fromYaml -}}
{{- if eq $model.kind "hf" }}
- name: models
  {{- if or .Values.modelCache.create .Values.modelCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ include "lull.modelClaim" . }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- else if eq $model.kind "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $model.claim }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* Its mount. Call with (dict "root" $ "readOnly" bool). */}}
{{- define "lull.modelMounts" -}}
{{- $model := include "lull.model" .root | fromYaml -}}
{{- if eq $model.kind "hf" -}}
- name: models
  mountPath: /models/hf
  readOnly: {{ .readOnly }}
{{- else if eq $model.kind "pvc" -}}
- name: models
  mountPath: {{ printf "/models/pvc/%s" $model.claim }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The init container that downloads an hf:// model (files/model/fetch.py). Call with
(dict "root" $ "role" ...): GPU workers fetch every file, the others config and tokenizer. */}}
{{- define "lull.modelInit" -}}
{{- $ := .root -}}
{{- $model := include "lull.model" $ | fromYaml -}}
{{- if eq $model.kind "hf" -}}
- name: fetch-model
  image: {{ include "lull.image" $ }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  command: ["python", "-c", {{ $.Files.Get "files/model/fetch.py" | toJson }}]
  env:
    - {name: LULL_MODEL_REPO, value: {{ $model.repo | quote }}}
    - {name: LULL_MODEL_REVISION, value: {{ $model.revision | quote }}}
    - {name: LULL_MODEL_DIR, value: {{ $model.dir | quote }}}
    - {name: LULL_MODEL_FILES, value: {{ ternary "all" "metadata" (eq .role "worker") | quote }}}
    - {name: HF_HUB_DISABLE_TELEMETRY, value: "1"}
    {{- with $.Values.modelCache.hfTokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: hf-token
    {{- end }}
  securityContext:
    {{- include "lull.containerSecurityContext" (dict "readOnlyRoot" true) | nindent 4 }}
  volumeMounts:
    {{- include "lull.scratchMounts" . | nindent 4 }}
    {{- include "lull.modelMounts" (dict "root" $ "readOnly" false) | nindent 4 }}
{{- end -}}
{{- end -}}
