{{/*
Names and labels.
*/}}
{{- define "sheap-dask.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource-name prefix; trimmed to 40 characters so that "-worker-<group>" suffixes stay valid DNS labels. */}}
{{- define "sheap-dask.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sheap-dask.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels shared by every pod of the release (the NetworkPolicies select on them). */}}
{{- define "sheap-dask.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sheap-dask.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sheap-dask.labels" -}}
helm.sh/chart: {{ include "sheap-dask.chart" . }}
{{ include "sheap-dask.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sheap-dask
{{- end -}}

{{- define "sheap-dask.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sheap-dask.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Image reference. Call with (dict "root" $ "image" <map with optional repository/tag> "suffix" <tag suffix>).
An empty tag means the chart's appVersion (+ suffix), so images match the package version.
*/}}
{{- define "sheap-dask.image" -}}
{{- $img := default dict .image -}}
{{- $repo := default .root.Values.image.repository $img.repository -}}
{{- $tag := $img.tag -}}
{{- if not $tag -}}
{{- $tag = printf "%s%s" (default .root.Chart.AppVersion .root.Values.image.tag) (default "" .suffix) -}}
{{- end -}}
{{- printf "%s:%s" $repo (toString $tag) -}}
{{- end -}}

{{/* Address workers, the notebook and the fit Job use: the scheduler Service, inside the namespace. */}}
{{- define "sheap-dask.schedulerAddress" -}}
{{- printf "tcp://%s-scheduler:%d" (include "sheap-dask.fullname" .) (int .Values.scheduler.port) -}}
{{- end -}}

{{/*
Threads of one worker: threadsPerWorker, else the CPU limit rounded up ("500m" -> 1, "1.5" -> 2, 2 -> 2),
else 1. Call with a worker-group map.
*/}}
{{- define "sheap-dask.threads" -}}
{{- if .threadsPerWorker -}}
{{- .threadsPerWorker | int -}}
{{- else -}}
{{- $cpu := "" -}}
{{- with .resources -}}{{- with .limits -}}{{- with .cpu -}}{{- $cpu = toString . -}}{{- end -}}{{- end -}}{{- end -}}
{{- if not $cpu -}}
1
{{- else if hasSuffix "m" $cpu -}}
{{- max 1 (div (add (trimSuffix "m" $cpu | int64) 999) 1000) -}}
{{- else -}}
{{- max 1 (ceil ($cpu | float64) | int64) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Kubernetes memory quantity -> a byte string dask.utils.parse_bytes reads with the same value:
"4Gi" -> "4GiB", "4G" -> "4GB", "512k" -> "512kB", "1e9" and plain bytes unchanged, "5000m" (milli-bytes) -> bytes.
*/}}
{{- define "sheap-dask.daskBytes" -}}
{{- $q := . -}}
{{- if kindIs "string" $q -}}
{{- if regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi)$" $q -}}
{{- printf "%sB" $q -}}
{{- else if regexMatch "^[0-9]+(\\.[0-9]+)?[kMGTP]$" $q -}}
{{- printf "%sB" $q -}}
{{- else if regexMatch "^[0-9]+(\\.[0-9]+)?([eE][0-9]+)?$" $q -}}
{{- $q -}}
{{- else if regexMatch "^[0-9]+m$" $q -}}
{{- div (trimSuffix "m" $q | int64) 1000 -}}
{{- else -}}
{{- fail (printf "memory quantity %q cannot be converted to a Dask memory limit: use a plain number of bytes or a suffix among Ki Mi Gi Ti Pi k M G T P, or set worker.memoryLimit (e.g. 4GiB)" $q) -}}
{{- end -}}
{{- else -}}
{{- printf "%d" ($q | int64) -}}
{{- end -}}
{{- end -}}

{{/* --memory-limit of a worker group: memoryLimit, else the container memory limit, else "auto". */}}
{{- define "sheap-dask.memoryLimit" -}}
{{- if .memoryLimit -}}
{{- .memoryLimit -}}
{{- else -}}
{{- $mem := "" -}}
{{- with .resources -}}{{- with .limits -}}{{- with .memory -}}{{- $mem = . -}}{{- end -}}{{- end -}}{{- end -}}
{{- if $mem -}}
{{- include "sheap-dask.daskBytes" $mem -}}
{{- else -}}
auto
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
sheapConfig flattened to dask.config environment variables (YAML "NAME: value" lines):
{fit: {num_steps: 3000}} -> DASK_SHEAP_DASK__FIT__NUM_STEPS: "3000". Hyphens become underscores
(dask.config treats them alike). dask reads values with ast.literal_eval, so strings are written as
Python literals ('none' stays the string "none" instead of becoming None) and lists as JSON.
Call with (dict "prefix" "DASK_SHEAP_DASK" "value" <map>).
*/}}
{{- define "sheap-dask.flattenConfig" -}}
{{- $prefix := .prefix -}}
{{- range $k, $v := .value }}
{{- $name := printf "%s__%s" $prefix ($k | replace "-" "_" | upper) -}}
{{- if kindIs "map" $v }}
{{ include "sheap-dask.flattenConfig" (dict "prefix" $name "value" $v) }}
{{- else if kindIs "slice" $v }}
{{ $name }}: {{ toJson $v | quote }}
{{- else if kindIs "invalid" $v }}
{{ $name }}: "None"
{{- else if kindIs "string" $v }}
{{ $name }}: {{ printf "'%s'" ($v | replace "\\" "\\\\" | replace "'" "\\'") | quote }}
{{- else }}
{{ $name }}: {{ toString $v | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Environment of one container as a list of EnvVar: chart defaults < sheapConfig < env < component env,
later sources winning, names sorted so renders are stable. Call with (dict "root" $ "defaults" <map> "env" <map>).
*/}}
{{- define "sheap-dask.env" -}}
{{- $all := dict -}}
{{- range $k, $v := .defaults }}{{ $_ := set $all $k $v }}{{ end -}}
{{- $flat := include "sheap-dask.flattenConfig" (dict "prefix" "DASK_SHEAP_DASK" "value" .root.Values.sheapConfig) | fromYaml -}}
{{- range $k, $v := $flat }}{{ $_ := set $all $k $v }}{{ end -}}
{{- range $k, $v := .root.Values.env }}{{ $_ := set $all $k $v }}{{ end -}}
{{- range $k, $v := .env }}{{ $_ := set $all $k $v }}{{ end -}}
{{- range $k := keys $all | sortAlpha }}
- name: {{ $k }}
  value: {{ get $all $k | toString | quote }}
{{- end }}
{{- end -}}

{{/* Name of the Secret with object-storage credentials, empty when there is none. */}}
{{- define "sheap-dask.objectStorageSecret" -}}
{{- if .Values.objectStorage.existingSecret -}}
{{- .Values.objectStorage.existingSecret -}}
{{- else if .Values.objectStorage.secretEnv -}}
{{- printf "%s-object-storage" (include "sheap-dask.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* envFrom of containers that read or write the data (workers, notebook, fit Job). */}}
{{- define "sheap-dask.objectStorageEnvFrom" -}}
{{- with include "sheap-dask.objectStorageSecret" . }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end -}}

{{/* Extra volumeMounts / volumes for the credentials files (objectStorage.mountPath). */}}
{{- define "sheap-dask.objectStorageMount" -}}
{{- if and .Values.objectStorage.mountPath (include "sheap-dask.objectStorageSecret" .) }}
- name: object-storage
  mountPath: {{ .Values.objectStorage.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "sheap-dask.objectStorageVolume" -}}
{{- with include "sheap-dask.objectStorageSecret" . }}
{{- if $.Values.objectStorage.mountPath }}
- name: object-storage
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod fields every pod shares: service account, security context, no service-link env noise. */}}
{{- define "sheap-dask.podCommon" -}}
serviceAccountName: {{ include "sheap-dask.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
