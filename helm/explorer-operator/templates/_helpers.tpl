{{- define "explorer-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "explorer-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "explorer-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator pod's name label is what job NetworkPolicies admit on the coordinator's status port. */}}
{{- define "explorer-operator.selectorLabels" -}}
app.kubernetes.io/name: explorer-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "explorer-operator.labels" -}}
{{ include "explorer-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "explorer-operator.watchNamespaces" -}}
{{- $namespaces := .Values.rbac.watchNamespaces | default (list .Release.Namespace) -}}
{{- join "," $namespaces -}}
{{- end -}}

{{/* What the operator does to the children of a job, nothing more (no Secrets, no nodes, no CRD writes). */}}
{{- define "explorer-operator.rules" -}}
- apiGroups: ["explorer.rft.dev"]
  resources: ["explorerjobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["explorer.rft.dev"]
  resources: ["explorerjobs/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["pods", "services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The job's storage claim: made and watched, never deleted by the operator (garbage collection removes a claim the
# job owns under whenDeleted: Delete).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The job's credentials Secret: created once, patched only to rotate its trainer token; garbage collection deletes
# it with the job. (The watch is filtered to the job label: the operator never lists other Secrets' data.)
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
