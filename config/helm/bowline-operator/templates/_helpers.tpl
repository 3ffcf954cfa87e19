{{/* Labels on everything the chart makes. */}}
{{- define "bowline-operator.labels" -}}
app.kubernetes.io/name: bowline-operator
app.kubernetes.io/part-of: bowline
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What selects the operator's pods. */}}
{{- define "bowline-operator.selector" -}}
app.kubernetes.io/name: bowline-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
