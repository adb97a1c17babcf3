{{/* Names, labels and the pieces every pod shares. */}}

{{- define "helios.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "helios.fullname" -}}
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

{{- define "helios.multiPod" -}}
{{- if eq .Values.topology "multi-pod" }}true{{ end }}
{{- end }}

{{/* Labels of every object; `component` (server, coordinator, worker, etcd) is added per pod. */}}
{{- define "helios.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "helios.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: call with (list $ "worker"). */}}
{{- define "helios.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "helios.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The component that serves the APIs. */}}
{{- define "helios.apiComponent" -}}
{{- if include "helios.multiPod" . }}coordinator{{ else }}server{{ end }}
{{- end }}

{{- define "helios.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "helios.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "helios.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "helios.cluster" -}}
{{- default .Release.Name .Values.etcd.cluster }}
{{- end }}

{{- define "helios.clusterSecretName" -}}
{{- default (printf "%s-cluster" (include "helios.fullname" .)) .Values.clusterSecret.existingSecret }}
{{- end }}

{{- define "helios.apiKeySecretName" -}}
{{- default (printf "%s-api-keys" (include "helios.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "helios.apiKeysEnabled" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys }}true{{ end }}
{{- end }}

{{/* The headless Services' names: workers and etcd members resolve as POD.SERVICE. */}}
{{- define "helios.workersService" -}}
{{ include "helios.fullname" . }}-workers
{{- end }}

{{- define "helios.etcdService" -}}
{{ include "helios.fullname" . }}-etcd
{{- end }}

{{- define "helios.svcDomain" -}}
{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end }}

{{- define "helios.etcdEndpoints" -}}
{{- if .Values.etcd.bundled }}
{{- printf "http://%s.%s:2379" (include "helios.etcdService" .) (include "helios.svcDomain" .) }}
{{- else }}
{{- join "," .Values.etcd.endpoints }}
{{- end }}
{{- end }}

{{- define "helios.modelPath" -}}
/models/{{ .Values.model.path }}
{{- end }}

{{/* The restricted security context of every container. */}}
{{- define "helios.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* The start of every pod's spec: its account (no API token: Helios never calls the
Kubernetes API), the restricted pod security context, the pull secrets. */}}
{{- define "helios.podIdentity" -}}
serviceAccountName: {{ include "helios.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* nodeSelector, tolerations and affinity of one kind of pod (.Values.server, .Values.worker). */}}
{{- define "helios.podPlacement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A container's resources with `gpus` GPUs added to its limits when gpu.enabled:
call with (list $ resources gpus). */}}
{{- define "helios.resources" -}}
{{- $ := index . 0 }}
{{- $res := deepCopy (index . 1) }}
{{- if $.Values.gpu.enabled }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits $.Values.gpu.resourceName (index . 2) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* The cluster secret as the file /etc/helios/cluster/secret (multi-pod). */}}
{{- define "helios.clusterSecretVolume" -}}
- name: cluster-secret
  secret:
    secretName: {{ include "helios.clusterSecretName" . }}
    defaultMode: 0440
    items:
      - key: secret
        path: secret
{{- end }}

{{- define "helios.clusterSecretMount" -}}
- name: cluster-secret
  mountPath: /etc/helios/cluster
  readOnly: true
{{- end }}

{{/* Flags for etcd: endpoints, TLS, user (multi-pod with membership etcd). */}}
{{- define "helios.etcdArgs" -}}
- --etcd={{ include "helios.etcdEndpoints" . }}
- --cluster={{ include "helios.cluster" . }}
{{- if and (not .Values.etcd.bundled) .Values.etcd.tlsSecret }}
- --etcd-ca=/etc/helios/etcd-tls/ca.crt
{{- if .Values.etcd.clientCertificate }}
- --etcd-cert=/etc/helios/etcd-tls/tls.crt
- --etcd-key=/etc/helios/etcd-tls/tls.key
{{- end }}
{{- end }}
{{- if and (not .Values.etcd.bundled) .Values.etcd.user }}
- --etcd-user={{ .Values.etcd.user }}
- --etcd-password-file=/etc/helios/etcd-password/password
{{- end }}
{{- end }}

{{- define "helios.etcdMounts" -}}
{{- if and (not .Values.etcd.bundled) .Values.etcd.tlsSecret }}
- name: etcd-tls
  mountPath: /etc/helios/etcd-tls
  readOnly: true
{{- end }}
{{- if and (not .Values.etcd.bundled) .Values.etcd.user }}
- name: etcd-password
  mountPath: /etc/helios/etcd-password
  readOnly: true
{{- end }}
{{- end }}

{{- define "helios.etcdVolumes" -}}
{{- if and (not .Values.etcd.bundled) .Values.etcd.tlsSecret }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.tlsSecret }}
    defaultMode: 0440
{{- end }}
{{- if and (not .Values.etcd.bundled) .Values.etcd.user }}
- name: etcd-password
  secret:
    secretName: {{ .Values.etcd.passwordSecret }}
    defaultMode: 0440
    items:
      - key: password
        path: password
{{- end }}
{{- end }}

{{/* The model volume, and the init container that fetches into it. */}}
{{- define "helios.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- else }}
  emptyDir: {}
- name: fetch-script
  configMap:
    name: {{ include "helios.fullname" . }}-fetch-model
    defaultMode: 0555
{{- end }}
{{- end }}

{{- define "helios.modelMount" -}}
- name: model
  mountPath: /models
  readOnly: true
{{- end }}

{{- define "helios.initContainers" -}}
{{- if eq .Values.model.source "fetch" }}
initContainers:
  - name: fetch-model
    image: {{ .Values.model.fetch.image }}
    imagePullPolicy: IfNotPresent
    command:
      {{- if .Values.model.fetch.command }}
      {{- toYaml .Values.model.fetch.command | nindent 6 }}
      {{- else }}
      - bash
      - /scripts/fetch-model.sh
      {{- end }}
    env:
      - name: HELIOS_MODELS_DIR
        value: /models
      - name: HOME
        value: /tmp
      - name: PIP_CACHE_DIR
        value: /tmp/pip
    securityContext:
      {{- include "helios.containerSecurityContext" . | nindent 6 }}
    resources:
      {{- toYaml .Values.model.fetch.resources | nindent 6 }}
    volumeMounts:
      - name: model
        mountPath: /models
      - name: fetch-script
        mountPath: /scripts
        readOnly: true
      - name: tmp
        mountPath: /tmp
{{- end }}
{{- end }}

{{/* Flags, mounts and volumes of the API server (helios serve / helios coordinator). */}}
{{- define "helios.apiArgs" -}}
- --model={{ include "helios.modelPath" . }}
- --host=0.0.0.0
- --port={{ .Values.ports.grpc }}
- --http-port={{ .Values.ports.http }}
- --shutdown-grace={{ .Values.shutdownGrace }}
- --recovery-timeout={{ .Values.recoveryTimeout }}
- --kv-cache-memory={{ .Values.kvCacheMemoryMiB }}
- --log-format={{ .Values.logFormat }}
{{- if .Values.model.dequantize }}
- --dequantize
{{- end }}
{{- if .Values.tls.secretName }}
- --tls-cert=/etc/helios/tls/tls.crt
- --tls-key=/etc/helios/tls/tls.key
{{- end }}
{{- if .Values.tls.clientCaSecret }}
- --tls-client-ca=/etc/helios/client-ca/ca.crt
{{- end }}
{{- if include "helios.apiKeysEnabled" . }}
- --api-key-file=/etc/helios/api-keys/keys
{{- end }}
{{- if .Values.apiKeys.protectMetrics }}
- --protect-metrics
{{- end }}
{{- end }}

{{- define "helios.apiMounts" -}}
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: /etc/helios/tls
  readOnly: true
{{- end }}
{{- if .Values.tls.clientCaSecret }}
- name: client-ca
  mountPath: /etc/helios/client-ca
  readOnly: true
{{- end }}
{{- if include "helios.apiKeysEnabled" . }}
- name: api-keys
  mountPath: /etc/helios/api-keys
  readOnly: true
{{- end }}
{{- end }}

{{- define "helios.apiVolumes" -}}
{{- if .Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if .Values.tls.clientCaSecret }}
- name: client-ca
  secret:
    secretName: {{ .Values.tls.clientCaSecret }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if include "helios.apiKeysEnabled" . }}
- name: api-keys
  secret:
    secretName: {{ include "helios.apiKeySecretName" . }}
    defaultMode: 0440
    items:
      - key: keys
        path: keys
{{- end }}
{{- end }}

{{/* Probes of the API container: HTTPS when the APIs speak TLS. */}}
{{- define "helios.apiProbes" -}}
{{- $scheme := ternary "HTTPS" "HTTP" (not (empty .Values.tls.secretName)) }}
startupProbe:
  httpGet: {path: /live, port: http, scheme: {{ $scheme }}}
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
readinessProbe:
  httpGet: {path: /health, port: http, scheme: {{ $scheme }}}
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
livenessProbe:
  httpGet: {path: /live, port: http, scheme: {{ $scheme }}}
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
{{- end }}

{{- define "helios.apiPorts" -}}
- name: grpc
  containerPort: {{ .Values.ports.grpc }}
  protocol: TCP
- name: http
  containerPort: {{ .Values.ports.http }}
  protocol: TCP
{{- end }}

{{/* Pods get the drain's grace and 15 s to flush and exit. */}}
{{- define "helios.terminationGrace" -}}
{{ add .Values.shutdownGrace 15 }}
{{- end }}

{{- define "helios.shmVolume" -}}
{{- if .Values.shm.enabled }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.size }}
{{- end }}
{{- end }}

{{- define "helios.shmMount" -}}
{{- if .Values.shm.enabled }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- end }}
