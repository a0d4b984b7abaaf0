{{/* Names ------------------------------------------------------------------------------------- */}}

{{- define "clobjob.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name; ≤ 40 characters so that every suffix below keeps names ≤ 63. */}}
{{- define "clobjob.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "clobjob.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "clobjob.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The run this revision plans and works. */}}
{{- define "clobjob.runId" -}}
{{- printf "%s-%d" .Release.Name (int .Release.Revision) }}
{{- end }}

{{/* The worker Job of this revision (≤ 63 characters: the full name is cut, never the revision). */}}
{{- define "clobjob.workerJob" -}}
{{- $suffix := printf "-worker-%d" (int .Release.Revision) }}
{{- printf "%s%s" (include "clobjob.fullname" . | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "clobjob.serviceAccountName" -}}
{{- default (include "clobjob.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "clobjob.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------------ */}}

{{- define "clobjob.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clobjob.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object; pass (dict "ctx" . "component" "worker"). */}}
{{- define "clobjob.labels" -}}
{{ include "clobjob.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: clobjob
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of a run's objects (plan hook, worker Job and their pods). */}}
{{- define "clobjob.runLabels" -}}
{{ include "clobjob.labels" . }}
clobjob.io/run-id: {{ include "clobjob.runId" .ctx }}
{{- end }}

{{/* Settings ---------------------------------------------------------------------------------- */}}

{{/* The ConfigMap / Secret holding the settings: the release's, or a hook's own copy (hooks run before the
     release's objects exist). Pass (dict "ctx" . "hook" bool). */}}
{{- define "clobjob.settingsName" -}}
{{- if .hook }}{{ include "clobjob.fullname" .ctx }}-plan{{ else }}{{ include "clobjob.fullname" .ctx }}{{ end }}
{{- end }}

{{- define "clobjob.hookAnnotations" -}}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: "-10"
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}

{{- define "clobjob.subgraphUrl" -}}
{{- if .Values.sim.enabled }}
{{- printf "http://%s-sim:8787/subgraphs/orderbook-subgraph/gn" (include "clobjob.fullname" .) }}
{{- else }}
{{- .Values.subgraph.url }}
{{- end }}
{{- end }}

{{/* The ClickHouse URL the chart's Secret holds (empty when an existing Secret holds it). */}}
{{- define "clobjob.clickhouseUrl" -}}
{{- if .Values.clickhouse.deploy }}
{{- printf "http://clobjob@%s-clickhouse:8123" (include "clobjob.fullname" .) }}
{{- else if not (and .Values.clickhouse.existingSecret .Values.clickhouse.existingSecretKeys.url) }}
{{- required "clickhouse.url is required (http(s)://user@host:8123), or clickhouse.existingSecret with existingSecretKeys.url, or clickhouse.deploy=true" .Values.clickhouse.url }}
{{- end }}
{{- end }}

{{- define "clobjob.clickhousePassword" -}}
{{- if .Values.clickhouse.deploy }}
{{- required "clickhouse.deploy needs clickhouse.password (the password of the deployed server's clobjob user)" .Values.clickhouse.password }}
{{- else }}
{{- .Values.clickhouse.password }}
{{- end }}
{{- end }}

{{/* The ConfigMap's data: every non-secret setting as a CLOBJOB_* variable. */}}
{{- define "clobjob.settingsData" -}}
CLOBJOB_CLICKHOUSE_DATABASE: {{ .Values.clickhouse.database | quote }}
{{- with .Values.clickhouse.cluster }}
CLOBJOB_CLICKHOUSE_CLUSTER: {{ . | quote }}
{{- end }}
{{- with include "clobjob.subgraphUrl" . }}
CLOBJOB_SUBGRAPH_URL: {{ . | quote }}
{{- end }}
CLOBJOB_SOURCE: {{ .Values.source | quote }}
CLOBJOB_LOG_FORMAT: "json"
CLOBJOB_HOME: "/tmp/clobjob"
{{- $own := dict "CLICKHOUSE_URL" "clickhouse.url" "CLICKHOUSE_PASSWORD" "clickhouse.password"
      "CLICKHOUSE_DATABASE" "clickhouse.database" "CLICKHOUSE_CLUSTER" "clickhouse.cluster" "SUBGRAPH_URL" "subgraph.url"
      "SUBGRAPH_API_KEY" "subgraph.apiKey" "RPC_URL" "rpc.url" "SOURCE" "source" "METRICS_PORT" "metrics.port"
      "LOG_FORMAT" "nothing (pods log JSON)" "HOME" "nothing (it is /tmp/clobjob, the writable emptyDir)" }}
{{- range $name, $value := .Values.settings }}
{{- with get $own $name }}
{{- fail (printf "settings.%s: the chart sets CLOBJOB_%s itself; use %s" $name $name .) }}
{{- end }}
{{ printf "CLOBJOB_%s" $name }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* The Secret's data: whatever secret was given inline. */}}
{{- define "clobjob.secretData" -}}
{{- with include "clobjob.clickhouseUrl" . }}
clickhouse-url: {{ . | b64enc | quote }}
{{- end }}
{{- with include "clobjob.clickhousePassword" . }}
clickhouse-password: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.subgraph.apiKey }}
subgraph-api-key: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.rpc.url }}
rpc-url: {{ . | b64enc | quote }}
{{- end }}
{{- end }}

{{- define "clobjob.secretRef" -}}
- name: {{ .var }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end }}

{{/* A container's settings: envFrom the ConfigMap, secrets by reference, the pod's identity.
     Pass (dict "ctx" . "hook" bool). */}}
{{- define "clobjob.env" -}}
{{- $ctx := .ctx }}
{{- $own := include "clobjob.settingsName" . }}
{{- $ch := $ctx.Values.clickhouse }}
envFrom:
  - configMapRef:
      name: {{ $own }}
env:
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  {{- if and $ch.existingSecret $ch.existingSecretKeys.url (not $ch.deploy) }}
  {{- include "clobjob.secretRef" (dict "var" "CLOBJOB_CLICKHOUSE_URL" "secret" $ch.existingSecret "key" $ch.existingSecretKeys.url) | nindent 2 }}
  {{- else }}
  {{- include "clobjob.secretRef" (dict "var" "CLOBJOB_CLICKHOUSE_URL" "secret" $own "key" "clickhouse-url") | nindent 2 }}
  {{- end }}
  {{- if include "clobjob.clickhousePassword" $ctx }}
  {{- include "clobjob.secretRef" (dict "var" "CLOBJOB_CLICKHOUSE_PASSWORD" "secret" $own "key" "clickhouse-password") | nindent 2 }}
  {{- else if and $ch.existingSecret $ch.existingSecretKeys.password }}
  {{- include "clobjob.secretRef" (dict "var" "CLOBJOB_CLICKHOUSE_PASSWORD" "secret" $ch.existingSecret "key" $ch.existingSecretKeys.password "optional" true) | nindent 2 }}
  {{- end }}
  {{- if $ctx.Values.subgraph.existingSecret }}
  {{- include "clobjob.secretRef" (dict "var" "CLOBJOB_SUBGRAPH_API_KEY" "secret" $ctx.Values.subgraph.existingSecret "key" $ctx.Values.subgraph.existingSecretKey) | nindent 2 }}
  {{- else if $ctx.Values.subgraph.apiKey }}
  {{- include "clobjob.secretRef" (dict "var" "CLOBJOB_SUBGRAPH_API_KEY" "secret" $own "key" "subgraph-api-key") | nindent 2 }}
  {{- end }}
  {{- if $ctx.Values.rpc.existingSecret }}
  {{- include "clobjob.secretRef" (dict "var" "CLOBJOB_RPC_URL" "secret" $ctx.Values.rpc.existingSecret "key" $ctx.Values.rpc.existingSecretKey) | nindent 2 }}
  {{- else if $ctx.Values.rpc.url }}
  {{- include "clobjob.secretRef" (dict "var" "CLOBJOB_RPC_URL" "secret" $own "key" "rpc-url") | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Pods and containers ------------------------------------------------------------------------ */}}

{{- define "clobjob.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "clobjob.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* A clobjob container: image, args, settings, hardened, /tmp writable. Pass (dict "ctx" . "hook" bool
     "name" "worker" "args" (list ...) "resources" {...} "mounts" (list ...)
     "extraEnv" (list ...) "ports" (list ...)); the last four are optional. */}}
{{- define "clobjob.container" -}}
- name: {{ .name }}
  image: {{ include "clobjob.image" .ctx }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  args:
    {{- range .args }}
    - {{ . | quote }}
    {{- end }}
  {{- include "clobjob.env" . | trim | nindent 2 }}
  {{- with .extraEnv }}
  {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .ports }}
  ports:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "clobjob.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- with .mounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Scheduling and pod-level settings shared by every clobjob pod. */}}
{{- define "clobjob.podCommon" -}}
securityContext:
  {{- include "clobjob.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The rules of a clobjob Job's pods: exit 2 is permanent (bad configuration or input), an eviction or
     preemption does not count as a failure. */}}
{{- define "clobjob.podFailurePolicy" -}}
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        {{- with .container }}
        containerName: {{ . }}
        {{- end }}
        operator: In
        values: [2]
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
{{- end }}

{{/* A one-off clobjob pod for `kubectl run --overrides`: the workers' image, settings and hardening, and
     with "serviceAccount" true the chart's ServiceAccount and its token (rerun creates Jobs).
     Pass (dict "ctx" . "name" "status" "args" (list ...) "serviceAccount" bool). */}}
{{- define "clobjob.toolPodJson" -}}
{{- $name := printf "%s-%s" (include "clobjob.fullname" .ctx) .name }}
{{- $container := include "clobjob.container" (dict "ctx" .ctx "hook" false "name" $name "args" .args) | fromYamlArray | first }}
{{- $spec := dict "restartPolicy" "Never" "containers" (list $container)
      "securityContext" (include "clobjob.podSecurityContext" . | fromYaml)
      "volumes" (list (dict "name" "tmp" "emptyDir" dict)) }}
{{- if .serviceAccount }}
{{- $_ := set $spec "serviceAccountName" (include "clobjob.serviceAccountName" .ctx) }}
{{- $_ := set $spec "automountServiceAccountToken" true }}
{{- else }}
{{- $_ := set $spec "automountServiceAccountToken" false }}
{{- end }}
{{- dict "apiVersion" "v1" "spec" $spec | toJson }}
{{- end }}

{{/* The `kubectl run` line of a one-off clobjob command. Pass (dict "ctx" . "name" "status" "args" (list ...)
     "serviceAccount" bool). */}}
{{- define "clobjob.kubectlRun" -}}
kubectl -n {{ .ctx.Release.Namespace }} run {{ include "clobjob.fullname" .ctx }}-{{ .name }} --rm -i --restart=Never --image={{ include "clobjob.image" .ctx }} --overrides='{{ include "clobjob.toolPodJson" . }}'
{{- end }}
