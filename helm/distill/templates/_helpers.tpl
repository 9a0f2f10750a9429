{{/*
Helpers of the distill chart.

Names the pipeline's WorkflowTemplate refers to are read from the template itself (files/pipeline.yaml, the
Hera render copied byte for byte), so the chart cannot drift from the DAG: its name, its ServiceAccount and
its artifact repository reference. The ConfigMap and Secret names below are the ones the DAG's env refers to;
tests/test_chart.py checks that every name the DAG refers to is one of these.
*/}}

{{/* The rendered pipeline, parsed. */}}
{{- define "distill.pipeline" -}}
{{- .Files.Get "files/pipeline.yaml" | fromYaml | toJson -}}
{{- end -}}

{{/* Name of the WorkflowTemplate (`distill`). */}}
{{- define "distill.templateName" -}}
{{- (include "distill.pipeline" . | fromJson).metadata.name -}}
{{- end -}}

{{/* ServiceAccount the workflow pods run as (`distill-workflow`). */}}
{{- define "distill.workflowServiceAccount" -}}
{{- (include "distill.pipeline" . | fromJson).spec.serviceAccountName -}}
{{- end -}}

{{/* The artifact repository ConfigMap and key the template refers to. */}}
{{- define "distill.artifactRepositoryConfigMap" -}}
{{- (include "distill.pipeline" . | fromJson).spec.artifactRepositoryRef.configMap -}}
{{- end -}}
{{- define "distill.artifactRepositoryKey" -}}
{{- (include "distill.pipeline" . | fromJson).spec.artifactRepositoryRef.key -}}
{{- end -}}

{{/* ConfigMap and Secrets the steps' env refers to; the chart creates the ConfigMap, never the Secrets. */}}
{{- define "distill.configMap" -}}distill-config{{- end -}}
{{- define "distill.secretS3" -}}distill-s3{{- end -}}
{{- define "distill.secretHub" -}}distill-hub{{- end -}}
{{- define "distill.secretTinker" -}}distill-tinker{{- end -}}

{{- define "distill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "distill.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels. */}}
{{- define "distill.labels" -}}
helm.sh/chart: {{ include "distill.chart" . }}
app.kubernetes.io/name: {{ include "distill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: distill
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Tag of the phase images. */}}
{{- define "distill.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{/* S3 endpoint as Argo's artifact repository wants it: host[:port], no scheme. */}}
{{- define "distill.s3Host" -}}
{{- if .Values.s3.endpoint -}}
{{- regexReplaceAll "^[a-zA-Z][a-zA-Z0-9+.-]*://" (trimSuffix "/" .Values.s3.endpoint) "" -}}
{{- else -}}
{{- printf "s3.%s.amazonaws.com" .Values.s3.region -}}
{{- end -}}
{{- end -}}

{{/* "true" when the endpoint is plain HTTP (MinIO in the cluster). */}}
{{- define "distill.s3Insecure" -}}
{{- hasPrefix "http://" .Values.s3.endpoint -}}
{{- end -}}

{{/* Workflow parameters of the runs the chart starts, except run-id. */}}
{{- define "distill.runParameters" -}}
- name: profile
  value: {{ .Values.run.profile | quote }}
- name: config
  value: {{ .Values.run.config | quote }}
- name: backend
  value: {{ .Values.run.backend | quote }}
- name: image-registry
  value: {{ .Values.image.registry | quote }}
{{- end -}}
