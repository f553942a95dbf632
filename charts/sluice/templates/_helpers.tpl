{{/* Names, labels and shared pod pieces of the sluice chart. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, or fullnameOverride. Truncated to 48 characters so that the longest
derived name, "<fullname>-worker-metrics", still fits a 63-character DNS label.
*/}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sluice.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "sluice.fullname" .) }}
{{- end }}

{{- define "sluice.worker.fullname" -}}
{{- printf "%s-worker" (include "sluice.fullname" .) }}
{{- end }}

{{/* The coordinator's in-cluster URL, where workers register. */}}
{{- define "sluice.coordinator.url" -}}
{{- printf "%s://%s.%s.svc:%v" (include "sluice.coordinator.scheme" .) (include "sluice.coordinator.fullname" .) .Release.Namespace .Values.coordinator.port }}
{{- end }}

{{- define "sluice.coordinator.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* Where the certificates of tls.* are mounted, in both pods. */}}
{{- define "sluice.tls.dir" -}}
/var/run/sluice/tls
{{- end }}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sluice.pipelineConfigMap" -}}
{{- default (printf "%s-pipeline" (include "sluice.fullname" .)) .Values.existingPipelineConfigMap }}
{{- end }}

{{- define "sluice.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* True when the coordinator owns the worker count through the Deployment's scale. */}}
{{- define "sluice.kubeScaler" -}}
{{- if and .Values.autoscaling.enabled (eq .Values.autoscaling.scaler "kube") }}true{{ end }}
{{- end }}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- end }}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: call with (dict "root" $ "component" "worker"). */}}
{{- define "sluice.componentSelectorLabels" -}}
{{ include "sluice.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "sluice.componentLabels" -}}
{{ include "sluice.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* A duration such as 10s, 250ms, 2m or 1h, in milliseconds (the schema allows only these). */}}
{{- define "sluice.durationMs" -}}
{{- $d := toString . }}
{{- $n := regexFind "^[0-9]+" $d }}
{{- $unit := trimPrefix $n $d }}
{{- $ms := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 }}
{{- mul (atoi $n) (get $ms $unit) }}
{{- end }}

{{/* Checks the values cannot express in the schema; fails the render with what to change. */}}
{{- define "sluice.validate" -}}
{{- if not .Values.auth.existingSecret }}
{{- fail "auth.existingSecret is required: create the coordinator token Secret first, e.g.\n  kubectl create secret generic sluice-token --from-literal=token=\"$(openssl rand -hex 32)\"\nand install with --set auth.existingSecret=sluice-token" }}
{{- end }}
{{- if and (not .Values.existingPipelineConfigMap) (not (trim .Values.pipeline)) }}
{{- fail "pipeline is empty: give the pipeline TOML in `pipeline`, or an existing ConfigMap in `existingPipelineConfigMap`" }}
{{- end }}
{{- $lease := include "sluice.durationMs" .Values.coordinator.leaseTimeout | int }}
{{- $heartbeat := include "sluice.durationMs" .Values.coordinator.heartbeatInterval | int }}
{{- if gt (mul 3 $heartbeat) $lease }}
{{- fail (printf "coordinator.heartbeatInterval (%s) must be at most a third of coordinator.leaseTimeout (%s)" .Values.coordinator.heartbeatInterval .Values.coordinator.leaseTimeout) }}
{{- end }}
{{- with .Values.tls }}
{{- if and .enabled (not .coordinatorSecret) }}
{{- fail "tls.enabled needs tls.coordinatorSecret: a Secret with the coordinator's tls.crt and tls.key (e.g. from a cert-manager Certificate for <fullname>-coordinator.<namespace>.svc)" }}
{{- end }}
{{- if and .mutual.enabled (not .enabled) }}
{{- fail "tls.mutual.enabled needs tls.enabled: mutual TLS is TLS first" }}
{{- end }}
{{- if and .mutual.enabled (not .mutual.workerSecret) }}
{{- fail "tls.mutual.enabled needs tls.mutual.workerSecret: a Secret with the workers' client tls.crt and tls.key" }}
{{- end }}
{{- end }}
{{- with .Values.autoscaling }}
{{- if gt (int .minReplicas) (int .maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%v) is above autoscaling.maxReplicas (%v)" .minReplicas .maxReplicas) }}
{{- end }}
{{- if and .scaleToZero (gt (int .minReplicas) 0) }}
{{- fail "autoscaling.scaleToZero needs autoscaling.minReplicas: 0" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The environment both containers get: the shared token, then the user's variables. */}}
{{- define "sluice.env" -}}
- name: SLUICE_COORDINATOR_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.existingSecret }}
      key: {{ .Values.auth.tokenKey }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "sluice.pipelineVolume" -}}
- name: pipeline
  configMap:
    name: {{ include "sluice.pipelineConfigMap" . }}
    items:
      - key: pipeline.toml
        path: pipeline.toml
{{- end }}

{{- define "sluice.volumeMounts" -}}
- name: pipeline
  mountPath: /etc/sluice
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Egress to the cluster DNS, which every pod needs once egress is restricted. */}}
{{- define "sluice.networkPolicy.dnsEgress" -}}
- to:
    - namespaceSelector: {}
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}

{{/* The coordinator's TLS files: its certificate and key, and with mutual TLS the client CA. */}}
{{- define "sluice.tls.coordinatorVolume" -}}
{{- with .Values.tls }}
- name: tls
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ .coordinatorSecret }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- if .mutual.enabled }}
      - secret:
          name: {{ default .mutual.workerSecret .mutual.clientCaSecret }}
          items:
            - key: {{ .mutual.clientCaKey }}
              path: client-ca.crt
      {{- end }}
{{- end }}
{{- end }}

{{/* The workers' TLS files: the CA of the coordinator, and with mutual TLS their client
certificate and key. Only these keys are projected, never the coordinator's key. */}}
{{- define "sluice.tls.workerVolume" -}}
{{- with .Values.tls }}
- name: tls
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ default .coordinatorSecret .caSecret }}
          items:
            - key: {{ .caKey }}
              path: ca.crt
      {{- if .mutual.enabled }}
      - secret:
          name: {{ .mutual.workerSecret }}
          items:
            - key: tls.crt
              path: client.crt
            - key: tls.key
              path: client.key
      {{- end }}
{{- end }}
{{- end }}

{{- define "sluice.tls.mount" -}}
- name: tls
  mountPath: {{ include "sluice.tls.dir" . }}
  readOnly: true
{{- end }}
