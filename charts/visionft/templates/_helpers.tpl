{{/* Names, labels and image references shared by the templates. */}}

{{- define "visionft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "visionft.fullname" -}}
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

{{- define "visionft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "visionft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "visionft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "visionft.labels" -}}
helm.sh/chart: {{ include "visionft.chart" . }}
{{ include "visionft.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: visionft
{{- end }}

{{- define "visionft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "visionft.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is set. Call with (dict "image" ... "root" $). */}}
{{- define "visionft.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "visionft.clusterWide" -}}
{{- if .Values.operator.watchNamespaces }}false{{ else }}true{{ end }}
{{- end }}

{{/*
The operator's permissions on the objects of the namespaces it serves: in a ClusterRole when it watches the
whole cluster, in a Role per namespace otherwise. tests/deploy/test_rbac.py derives the verbs the operator
code uses (its kubernetes client calls and Kopf's own needs) and checks that these rules cover them, and
that nothing here reaches Secrets.
*/}}
{{- define "visionft.namespacedRules" -}}
# The resource itself: watched and read; deleted when spec.runPolicy.ttlSecondsAfterFinished runs out.
# No patch or update: the operator keeps no state in the object (no finalizer, no annotation) and never
# writes what Git owns (spec, labels, annotations), so RBAC itself rules out drift for Argo CD and Flux.
- apiGroups: [visionft.io]
  resources: [visionfinetunes]
  verbs: [get, list, watch, delete]
# The operator writes its own status fields. It also creates, per run, a Role that grants the trainer
# get/patch on that one resource's status: RBAC escalation prevention requires the operator to hold them.
- apiGroups: [visionft.io]
  resources: [visionfinetunes/status]
  verbs: [get, patch]
# The children of each run, all owned by the VisionFineTune.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, watch, patch, delete]
# Services: the headless Service that gives the pods of a multi-node run stable names (nodes > 1).
- apiGroups: [""]
  resources: [configmaps, serviceaccounts, services]
  verbs: [create, get, list, watch, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [create, get, list, watch, patch, delete]
# Training pods are read for phase, exit reasons and restarts; the Job controller owns them.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# Events: posted on every transition (Kopf and the operator); a Job's Events are read for failure reasons.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch, list]
{{- end }}

{{- define "visionft.peeringRule" -}}
- apiGroups: [kopf.dev]
  resources: [{{ . }}]
  verbs: [get, list, watch, patch]
{{- end }}
