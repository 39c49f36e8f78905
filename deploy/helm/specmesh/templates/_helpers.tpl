{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "specmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release full name: every object is <fullname>-<component>. */}}
{{- define "specmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "specmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object name of a component: (dict "ctx" $ "component" "router"); at most 52 characters, so
"-headless" Services and StatefulSet revision labels (name-<hash>) stay within 63. */}}
{{- define "specmesh.componentName" -}}
{{- $full := include "specmesh.fullname" .ctx -}}
{{- printf "%s-%s" ($full | trunc (int (sub 51 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "specmesh.labels" -}}
helm.sh/chart: {{ include "specmesh.chart" .ctx }}
app.kubernetes.io/name: {{ include "specmesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: specmesh
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "specmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specmesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "specmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "specmesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* host:port of a component's gRPC Service, as the other components dial it. */}}
{{- define "specmesh.addr" -}}
{{- $c := index .ctx.Values .component -}}
{{- printf "%s:%d" (include "specmesh.componentName" .) (int $c.port) -}}
{{- end -}}

{{/* host:port of each pod of a StatefulSet component (draft, target), in ordinal order, joined by
commas: the stable DNS names its headless Service gives pod i (<sts>-i.<sts>-headless). The router
pairs draft i with target i from these lists; a target's name is its pair's id in treekv. */}}
{{- define "specmesh.podAddrs" -}}
{{- $c := index .ctx.Values .component -}}
{{- $sts := include "specmesh.componentName" . -}}
{{- $addrs := list -}}
{{- range $i := until (int $c.replicas) -}}
{{- $addrs = append $addrs (printf "%s-%d.%s-headless:%d" $sts $i $sts (int $c.port)) -}}
{{- end -}}
{{- join "," $addrs -}}
{{- end -}}

{{/* The default image tag: image.tag, else appVersion (+ "-cpu" for the CPU build). */}}
{{- define "specmesh.imageTag" -}}
{{- if .Values.image.tag -}}
{{- .Values.image.tag -}}
{{- else -}}
{{- .Chart.AppVersion -}}{{- if eq .Values.image.variant "cpu" -}}-cpu{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the mesh's shared secret. */}}
{{- define "specmesh.internalSecretName" -}}
{{- default (include "specmesh.componentName" (dict "ctx" . "component" "secret")) .Values.security.internalSecret.existingSecret -}}
{{- end -}}

{{/* A file under the models mount. */}}
{{- define "specmesh.modelPath" -}}
{{- printf "%s/%s" (.ctx.Values.models.mountPath | trimSuffix "/") (.path | trimPrefix "/") -}}
{{- end -}}

{{/*
Cross-field checks the schema cannot express (arithmetic between keys). Included once, by router.yaml.
Pairs: draft pod i pairs with target pod i, so there are as many drafts as targets (or none).
A request of maxContext tokens must fit each KV pool: beyond prompt + max_tokens, a draft session
needs about maxTree + subtreeSize slots of tree scratch and a target session subtreeSize (what the
services report to treekv as reserve_slots).
*/}}
{{- define "specmesh.validate" -}}
{{- $v := .Values -}}
{{- if and (gt (int $v.draft.replicas) 0) (ne (int $v.draft.replicas) (int $v.target.replicas)) -}}
{{- fail (printf "draft.replicas (%d) must equal target.replicas (%d), or be 0 for target-only: draft pod i pairs with target pod i" (int $v.draft.replicas) (int $v.target.replicas)) -}}
{{- end -}}
{{- $bs := int $v.kv.blockSize -}}
{{- $draftNeed := add (int $v.maxContext) (int $v.tree.maxTree) (int $v.tree.subtreeSize) -}}
{{- $targetNeed := add (int $v.maxContext) (int $v.tree.subtreeSize) -}}
{{- if lt (mul (int $v.kv.draftBlocks) $bs) $draftNeed -}}
{{- fail (printf "kv.draftBlocks x kv.blockSize = %d slots cannot hold one request of maxContext + tree.maxTree + tree.subtreeSize = %d" (mul (int $v.kv.draftBlocks) $bs) $draftNeed) -}}
{{- end -}}
{{- if lt (mul (int $v.kv.targetBlocks) $bs) $targetNeed -}}
{{- fail (printf "kv.targetBlocks x kv.blockSize = %d slots cannot hold one request of maxContext + tree.subtreeSize = %d" (mul (int $v.kv.targetBlocks) $bs) $targetNeed) -}}
{{- end -}}
{{- end -}}

{{/* The OTLP endpoint in force: otel.endpoint, else the bundled Jaeger, else empty (tracing off). */}}
{{- define "specmesh.otelEndpoint" -}}
{{- if .Values.otel.endpoint -}}
{{- .Values.otel.endpoint -}}
{{- else if .Values.jaeger.enabled -}}
{{- printf "http://%s:4317" (include "specmesh.componentName" (dict "ctx" . "component" "jaeger")) -}}
{{- end -}}
{{- end -}}

{{/*
GPUs a component requests: target = tp, draft = gpus, when its device is cuda; else 0.
*/}}
{{- define "specmesh.gpuCount" -}}
{{- $c := index .ctx.Values .component -}}
{{- if and (hasKey $c "device") (eq (toString $c.device) "cuda") -}}
{{- if eq .component "target" -}}{{ int $c.tp }}{{- else -}}{{ int (default 0 $c.gpus) }}{{- end -}}
{{- else -}}0{{- end -}}
{{- end -}}

{{/*
The pod template of a component. Arguments (dict):
  ctx: the root context; component: router|draft|target|treekv;
  args: flags after `serve <component>`; env: env entries (list of maps);
  ports: container ports (list of maps, the first is the gRPC port);
  models: whether to mount the model volume; shmSize: size of /dev/shm ("" for none).
*/}}
{{- define "specmesh.podTemplate" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $name := .component -}}
{{- $c := index $v $name -}}
{{- $sel := dict "ctx" $ctx "component" $name -}}
{{- $gpus := int (include "specmesh.gpuCount" $sel) -}}
{{- $repo := default $v.image.repository $c.image.repository -}}
{{- $tag := default (include "specmesh.imageTag" $ctx) $c.image.tag -}}
{{- $probes := mergeOverwrite (deepCopy $v.probes) (deepCopy (default (dict) $c.probes)) -}}
{{- $resources := deepCopy (default (dict) $c.resources) -}}
{{- if gt $gpus 0 -}}
{{- $limits := default (dict) (get $resources "limits") -}}
{{- $_ := set $limits $v.gpuResourceName $gpus -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- $affinity := deepCopy (default (dict) $c.affinity) -}}
{{- if and (eq $name "draft") $v.colocation.enabled -}}
{{- $term := dict "labelSelector" (dict "matchLabels" (fromYaml (include "specmesh.selectorLabels" (dict "ctx" $ctx "component" "target")))) "topologyKey" $v.colocation.topologyKey -}}
{{- $pa := default (dict) (get $affinity "podAffinity") -}}
{{- if eq $v.colocation.mode "required" -}}
{{- $req := default (list) (get $pa "requiredDuringSchedulingIgnoredDuringExecution") -}}
{{- $_ := set $pa "requiredDuringSchedulingIgnoredDuringExecution" (append $req $term) -}}
{{- else -}}
{{- $pref := default (list) (get $pa "preferredDuringSchedulingIgnoredDuringExecution") -}}
{{- $_ := set $pa "preferredDuringSchedulingIgnoredDuringExecution" (append $pref (dict "weight" (int $v.colocation.weight) "podAffinityTerm" $term)) -}}
{{- end -}}
{{- $_ := set $affinity "podAffinity" $pa -}}
{{- end -}}
{{- $grpcPort := int $c.port -}}
{{- /* extraArgs may add flags, never repeat one the chart sets (argparse keeps the last: a repeated
--pool-blocks would split the KV pools from treekv's, a repeated --port from the probes). */ -}}
{{- $chartFlags := list "--host" "--port" "--metrics-port" "--log-level" "--tls-cert" "--tls-key" "--tls-ca" "--api-key-file" "--shutdown-grace-s" -}}
{{- range .args }}{{ if hasPrefix "--" (toString .) }}{{ $chartFlags = append $chartFlags (toString .) }}{{ end }}{{ end -}}
{{- range $c.extraArgs }}
{{- $flag := regexReplaceAll "=.*$" (toString .) "" -}}
{{- if has $flag $chartFlags }}
{{- fail (printf "%s.extraArgs: %s is set by the chart; use its values key instead (see values.yaml)" $name $flag) }}
{{- end }}
{{- end -}}
metadata:
  labels:
    {{- include "specmesh.labels" $sel | nindent 4 }}
    {{- with $c.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if or $v.metrics.prometheusAnnotations $c.podAnnotations }}
  annotations:
    {{- if $v.metrics.prometheusAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ $v.metrics.port | quote }}
    prometheus.io/path: {{ $v.metrics.path | quote }}
    {{- end }}
    {{- with $c.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
spec:
  serviceAccountName: {{ include "specmesh.serviceAccountName" $ctx }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $c.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- /* Long enough for the preStop sleep plus the drain, or Kubernetes kills streams mid-drain. */}}
  {{- $drainSeconds := add (int $v.shutdown.preStopSeconds) (int $v.shutdown.graceSeconds) 10 }}
  {{- $terminationGrace := $drainSeconds }}
  {{- if not (kindIs "invalid" $c.terminationGracePeriodSeconds) }}
  {{- if lt (int $c.terminationGracePeriodSeconds) (int $drainSeconds) }}
  {{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be at least shutdown.preStopSeconds + shutdown.graceSeconds + 10 = %d" $name (int $c.terminationGracePeriodSeconds) (int $drainSeconds)) }}
  {{- end }}
  {{- $terminationGrace = int $c.terminationGracePeriodSeconds }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $terminationGrace }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $affinity }}
  affinity:
    {{- toYaml $affinity | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $name }}
      image: "{{ $repo }}:{{ $tag }}"
      imagePullPolicy: {{ $v.image.pullPolicy }}
      # The image's ENTRYPOINT is ["specmesh"]: args are `serve <component> [flags]`.
      args:
        - serve
        - {{ $name }}
        - --host
        - "0.0.0.0"
        - --port
        - {{ $grpcPort | quote }}
        - --metrics-port
        - {{ int $v.metrics.port | quote }}
        - --log-level
        - {{ default $v.logLevel $c.logLevel | upper | quote }}
        {{- with $v.security.tls.existingSecret }}
        - --tls-cert
        - {{ printf "%s/tls.crt" $v.security.tls.mountPath | quote }}
        - --tls-key
        - {{ printf "%s/tls.key" $v.security.tls.mountPath | quote }}
        - --tls-ca
        - {{ printf "%s/ca.crt" $v.security.tls.mountPath | quote }}
        {{- end }}
        {{- if and (eq $name "router") $v.security.apiKeys.existingSecret }}
        - --api-key-file
        - /etc/specmesh/api-keys/keys
        {{- end }}
        - --shutdown-grace-s
        - {{ int $v.shutdown.graceSeconds | quote }}
        {{- range .args }}
        - {{ . | quote }}
        {{- end }}
        {{- range $c.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      ports:
        {{- toYaml .ports | nindent 8 }}
        - name: metrics
          containerPort: {{ int $v.metrics.port }}
          protocol: TCP
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        - name: HOME
          value: /tmp
        - name: PYTHONUNBUFFERED
          value: "1"
        - name: SPECMESH_INTERNAL_SECRET
          valueFrom:
            secretKeyRef:
              name: {{ include "specmesh.internalSecretName" $ctx }}
              key: {{ $v.security.internalSecret.key }}
        - name: HF_HUB_OFFLINE
          value: "1"
        - name: TRANSFORMERS_OFFLINE
          value: "1"
        {{- if .models }}
        - name: SPECMESH_CACHE
          value: {{ $v.models.cache.mountPath | quote }}
        {{- end }}
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        - name: OTEL_SERVICE_NAME
          value: {{ printf "specmesh-%s" $name | quote }}
        {{- $endpoint := include "specmesh.otelEndpoint" $ctx }}
        {{- if $endpoint }}
        - name: OTEL_EXPORTER_OTLP_ENDPOINT
          value: {{ $endpoint | quote }}
        - name: OTEL_EXPORTER_OTLP_PROTOCOL
          value: grpc
        - name: OTEL_TRACES_EXPORTER
          value: otlp
        - name: OTEL_TRACES_SAMPLER
          value: {{ $v.otel.sampler | quote }}
        - name: OTEL_TRACES_SAMPLER_ARG
          value: {{ $v.otel.samplerArg | toString | quote }}
        {{- if not (kindIs "invalid" $v.otel.roundSampleRatio) }}
        - name: SPECMESH_TRACE_ROUNDS
          value: {{ $v.otel.roundSampleRatio | toString | quote }}
        {{- end }}
        {{- end }}
        - name: OTEL_RESOURCE_ATTRIBUTES
          value: {{ printf "service.namespace=%s,service.version=%s,k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),k8s.node.name=$(NODE_NAME)%s" $ctx.Release.Name $ctx.Chart.AppVersion (ternary (printf ",%s" $v.otel.resourceAttributes) "" (ne $v.otel.resourceAttributes "")) | quote }}
        {{- with $c.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if gt (int $v.shutdown.preStopSeconds) 0 }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", {{ int $v.shutdown.preStopSeconds | quote }}]
      {{- end }}
      {{- range $kind, $field := dict "startup" "startupProbe" "readiness" "readinessProbe" "liveness" "livenessProbe" }}
      {{- $p := get $probes $kind }}
      {{- if and $p (ne (toString (get $p "enabled")) "false") }}
      {{ $field }}:
        {{- if $v.security.tls.existingSecret }}
        tcpSocket:
          port: {{ $grpcPort }}
        {{- else }}
        grpc:
          port: {{ $grpcPort }}
        {{- end }}
        {{- toYaml (omit $p "enabled") | nindent 8 }}
      {{- end }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if $v.security.tls.existingSecret }}
        - name: tls
          mountPath: {{ $v.security.tls.mountPath }}
          readOnly: true
        {{- end }}
        {{- if and (eq $name "router") $v.security.apiKeys.existingSecret }}
        - name: api-keys
          mountPath: /etc/specmesh/api-keys
          readOnly: true
        {{- end }}
        {{- if .shmSize }}
        - name: dshm
          mountPath: /dev/shm
        {{- end }}
        {{- if and .models (ne $v.models.source "image") }}
        - name: models
          mountPath: {{ $v.models.mountPath }}
          readOnly: true
        {{- end }}
        {{- if .models }}
        - name: model-cache
          mountPath: {{ $v.models.cache.mountPath }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    {{- with $v.security.tls.existingSecret }}
    - name: tls
      secret:
        secretName: {{ . }}
    {{- end }}
    {{- if and (eq $name "router") $v.security.apiKeys.existingSecret }}
    - name: api-keys
      secret:
        secretName: {{ $v.security.apiKeys.existingSecret }}
        items:
          - key: {{ $v.security.apiKeys.key }}
            path: keys
    {{- end }}
    {{- if .shmSize }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .shmSize }}
    {{- end }}
    {{- if and .models (eq $v.models.source "pvc") }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ $v.models.pvc.claimName }}
        readOnly: {{ $v.models.pvc.readOnly }}
    {{- else if and .models (eq $v.models.source "hostPath") }}
    - name: models
      hostPath:
        path: {{ $v.models.hostPath.path }}
        type: ""
    {{- end }}
    {{- if .models }}
    - name: model-cache
      {{- if $v.models.cache.claimName }}
      persistentVolumeClaim:
        claimName: {{ $v.models.cache.claimName }}
      {{- else }}
      emptyDir:
        {{- with $v.models.cache.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
      {{- end }}
    {{- end }}
{{- end -}}

{{/* A ClusterIP (or other type) Service for a component: (dict ctx component ports headless type annotations). */}}
{{- define "specmesh.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "specmesh.componentName" . }}{{ if .headless }}-headless{{ end }}
  labels:
    {{- include "specmesh.labels" . | nindent 4 }}
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if .headless }}
  clusterIP: None
  # The tensor-channel rendezvous happens before the pods report ready.
  publishNotReadyAddresses: true
  {{- else }}
  type: {{ default "ClusterIP" .type }}
  {{- end }}
  selector:
    {{- include "specmesh.selectorLabels" . | nindent 4 }}
  ports:
    {{- toYaml .ports | nindent 4 }}
{{- end -}}
