{{/*
Names, labels, images and the pieces every peftreg pod shares.
*/}}

{{- define "peftreg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains
the chart name. Truncated to 63 characters (DNS label).
*/}}
{{- define "peftreg.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "peftreg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "peftreg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "peftreg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "peftreg.labels" -}}
helm.sh/chart: {{ include "peftreg.chart" . }}
{{ include "peftreg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: peftreg
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component (api, worker, migrate, gc). Call with (list $ "api"). */}}
{{- define "peftreg.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "peftreg.labels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "peftreg.componentSelectorLabels" -}}
{{- $root := index . 0 -}}
{{ include "peftreg.selectorLabels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "peftreg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "peftreg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "peftreg.configMapName" -}}
{{- printf "%s-config" (include "peftreg.fullname" .) }}
{{- end }}

{{/* The chart-managed Secret; it exists only for values without an existingSecret. */}}
{{- define "peftreg.secretName" -}}
{{- printf "%s-credentials" (include "peftreg.fullname" .) }}
{{- end }}

{{- define "peftreg.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "peftreg.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "peftreg.tag" .) }}
{{- end }}

{{/* The worker image: its own overrides, else the shared image with the GPU suffix. */}}
{{- define "peftreg.workerImage" -}}
{{- $repository := default .Values.image.repository .Values.worker.image.repository }}
{{- $tag := .Values.worker.image.tag }}
{{- if not $tag }}
{{- $tag = include "peftreg.tag" . }}
{{- if .Values.worker.gpu.enabled }}
{{- $tag = printf "%s%s" $tag .Values.worker.gpu.imageTagSuffix }}
{{- end }}
{{- end }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* Which credentials the chart stores itself (true) instead of an existing Secret. */}}
{{- define "peftreg.managesDatabaseUrl" -}}
{{- if not .Values.database.existingSecret }}true{{ end }}
{{- end }}

{{- define "peftreg.managesS3Keys" -}}
{{- if and (not .Values.s3.existingSecret) (or .Values.s3.accessKeyId .Values.s3.secretAccessKey) }}true{{ end }}
{{- end }}

{{- define "peftreg.managesAdminToken" -}}
{{- if and (not .Values.auth.existingSecret) .Values.auth.adminToken }}true{{ end }}
{{- end }}

{{- define "peftreg.managesSecret" -}}
{{- if or (include "peftreg.managesDatabaseUrl" .) (include "peftreg.managesS3Keys" .) (include "peftreg.managesAdminToken" .) }}true{{ end }}
{{- end }}

{{/*
Checks of values that the schema cannot express; each failure names the
value to fix. Included by every template that renders a workload.
*/}}
{{- define "peftreg.validate" -}}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) }}
{{- fail "database: set database.existingSecret (recommended) or database.url; peftreg in a cluster needs PostgreSQL" }}
{{- end }}
{{- if and (not .Values.database.existingSecret) (not (hasPrefix "postgresql" .Values.database.url)) }}
{{- fail (printf "database.url must be a PostgreSQL URL such as postgresql+psycopg://user:password@host:5432/db, not %q" (regexReplaceAll "://.*" .Values.database.url "://...")) }}
{{- end }}
{{- if and (not .Values.s3.existingSecret) (ne (empty .Values.s3.accessKeyId) (empty .Values.s3.secretAccessKey)) }}
{{- fail "s3: set both s3.accessKeyId and s3.secretAccessKey, or neither (to use the default credential chain), or s3.existingSecret" }}
{{- end }}
{{- if and .Values.api.autoscaling.enabled (gt (int .Values.api.autoscaling.minReplicas) (int .Values.api.autoscaling.maxReplicas)) }}
{{- fail (printf "api.autoscaling.minReplicas (%d) is greater than api.autoscaling.maxReplicas (%d)" (int .Values.api.autoscaling.minReplicas) (int .Values.api.autoscaling.maxReplicas)) }}
{{- end }}
{{- $pdb := .Values.api.podDisruptionBudget }}
{{- if and $pdb.enabled (eq (kindIs "invalid" $pdb.minAvailable) (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail "api.podDisruptionBudget: set exactly one of minAvailable and maxUnavailable (the other null)" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- fail "ingress.enabled needs at least one entry in ingress.hosts" }}
{{- end }}
{{- end }}

{{/*
Credentials reach containers only as secretKeyRef: to the existing Secret
when one is named, else to the chart-managed one. Never as literal values.
Each container gets only what it needs: the migration Job the database URL,
workers and gc the database and the bucket, the API also the admin token.
*/}}
{{- define "peftreg.databaseUrlEnv" -}}
- name: PEFTREG_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "peftreg.secretName" .) .Values.database.existingSecret }}
      key: {{ ternary .Values.database.existingSecretKey "database-url" (not (empty .Values.database.existingSecret)) }}
{{- end }}

{{/* Database and bucket credentials: workers, gc and the API. */}}
{{- define "peftreg.storageEnv" -}}
{{- $managed := include "peftreg.secretName" . -}}
{{ include "peftreg.databaseUrlEnv" . }}
{{- if or .Values.s3.existingSecret (include "peftreg.managesS3Keys" .) }}
- name: PEFTREG_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ default $managed .Values.s3.existingSecret }}
      key: {{ ternary .Values.s3.accessKeyIdKey "s3-access-key-id" (not (empty .Values.s3.existingSecret)) }}
- name: PEFTREG_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default $managed .Values.s3.existingSecret }}
      key: {{ ternary .Values.s3.secretAccessKeyKey "s3-secret-access-key" (not (empty .Values.s3.existingSecret)) }}
{{- end }}
{{- end }}

{{/* The bootstrap admin token: the API only. */}}
{{- define "peftreg.adminTokenEnv" -}}
{{- if or .Values.auth.existingSecret (include "peftreg.managesAdminToken" .) -}}
- name: PEFTREG_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ default (include "peftreg.secretName" .) .Values.auth.existingSecret }}
      key: {{ ternary .Values.auth.existingSecretKey "admin-token" (not (empty .Values.auth.existingSecret)) }}
{{- end }}
{{- end }}

{{/* The key signing registry tokens: the API only, the same in every replica. */}}
{{- define "peftreg.tokenSigningKeyEnv" -}}
{{- if .Values.auth.tokenSigningKeySecret -}}
- name: PEFTREG_TOKEN_SIGNING_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.tokenSigningKeySecret }}
      key: {{ .Values.auth.tokenSigningKeySecretKey }}
{{- end }}
{{- end }}

{{/* envFrom of every long-running peftreg container. */}}
{{- define "peftreg.envFrom" -}}
- configMapRef:
    name: {{ include "peftreg.configMapName" . }}
{{- end }}

{{/* Restart pods when the configuration or the chart-managed credentials change. */}}
{{- define "peftreg.checksumAnnotations" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/credentials: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}

{{/* The writable volumes of a read-only root filesystem. */}}
{{- define "peftreg.baseVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.volumes.tmpSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.volumes.homeSizeLimit }}
{{- end }}

{{- define "peftreg.baseVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /var/lib/peftreg
{{- end }}

{{- define "peftreg.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "peftreg.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}
