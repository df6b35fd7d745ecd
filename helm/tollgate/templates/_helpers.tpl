{{/* Chart name, truncated for label values. */}}
{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name of every object. */}}
{{- define "tollgate.fullname" -}}
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

{{- define "tollgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tollgate.labels" -}}
helm.sh/chart: {{ include "tollgate.chart" . }}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tollgate
{{- end }}

{{/* Selects the serving pods (not the migration Job's). */}}
{{- define "tollgate.serverSelectorLabels" -}}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/* The helm test Pod: outside the server's selector (and so outside its
NetworkPolicy), admitted to the gRPC port by that policy. */}}
{{- define "tollgate.testLabels" -}}
helm.sh/chart: {{ include "tollgate.chart" . }}
app.kubernetes.io/name: {{ include "tollgate.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: test
{{- end }}

{{- define "tollgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tollgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tollgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret holding the database URL, pepper and operator token. */}}
{{- define "tollgate.secretName" -}}
{{- default (include "tollgate.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "tollgate.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "tollgate.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* Whether the optional caller tokens are configured ("true" or ""). */}}
{{- define "tollgate.hasGatewayToken" -}}
{{- if or .Values.secrets.gatewayToken (and .Values.secrets.existingSecret .Values.secrets.existingSecretHolds.gatewayToken) }}true{{ end }}
{{- end }}
{{- define "tollgate.hasConsoleBackendToken" -}}
{{- if or .Values.secrets.consoleBackendToken (and .Values.secrets.existingSecret .Values.secrets.existingSecretHolds.consoleBackendToken) }}true{{ end }}
{{- end }}

{{/* Whether the forward-auth listener runs with a gateway secret ("true" or ""). */}}
{{- define "tollgate.hasForwardAuthSecret" -}}
{{- if and .Values.forwardAuth.enabled (or .Values.secrets.forwardAuthSecret (and .Values.secrets.existingSecret .Values.secrets.existingSecretHolds.forwardAuthSecret)) }}true{{ end }}
{{- end }}

{{/* config.toml lives in a Secret when it carries previous peppers. */}}
{{- define "tollgate.configInSecret" -}}
{{- if .Values.secrets.previousPeppers }}true{{ end }}
{{- end }}

{{/* Where the pod finds its files. */}}
{{- define "tollgate.configDir" -}}/etc/tollgate/config{{- end }}
{{- define "tollgate.secretDir" -}}/etc/tollgate/secrets{{- end }}

{{/* The profile TOML: a shipped one by name, or the user's own. */}}
{{- define "tollgate.profile" -}}
{{- if .Values.profile.custom }}
{{- .Values.profile.custom }}
{{- else }}
{{- $file := printf "profiles/%s.toml" .Values.profile.name }}
{{- $text := .Files.Get $file }}
{{- if not $text }}
{{- fail (printf "profile.name %q: no such profile in the chart (%s)" .Values.profile.name $file) }}
{{- end }}
{{- $text }}
{{- end }}
{{- end }}

{{/*
config.toml. Top-level dotted keys only, so config.extraToml may add keys
and tables after them; [[previous_peppers]] tables come last.
*/}}
{{- define "tollgate.configToml" -}}
{{- $c := .Values.config -}}
# Rendered by the tollgate Helm chart. The Deployment's environment
# (TOLLGATE_*, DATABASE_URL) overrides this file; the pod's wiring is set in
# both places, so either alone starts the server correctly.
listen = "0.0.0.0:{{ .Values.ports.grpc | int64 }}"
pepper_file = "{{ include "tollgate.secretDir" . }}/pepper"
operator_token_file = "{{ include "tollgate.secretDir" . }}/operator-token"
{{- if include "tollgate.hasGatewayToken" . }}
gateway_token_file = "{{ include "tollgate.secretDir" . }}/gateway-token"
{{- end }}
{{- if include "tollgate.hasConsoleBackendToken" . }}
console_backend_token_file = "{{ include "tollgate.secretDir" . }}/console-backend-token"
{{- end }}
profile = "{{ include "tollgate.configDir" . }}/profile.toml"
log_format = {{ $c.logFormat | quote }}
log_level = {{ $c.logLevel | toJson }}
pepper_version = {{ $c.pepperVersion | int64 }}
max_message_bytes = {{ $c.maxMessageBytes | int64 }}
max_connections = {{ $c.maxConnections | int64 }}
last_used_flush_seconds = {{ $c.lastUsedFlushSeconds | int64 }}
database.max_connections = {{ $c.database.maxConnections | int64 }}
database.min_connections = {{ $c.database.minConnections | int64 }}
database.acquire_timeout_ms = {{ $c.database.acquireTimeoutMs | int64 }}
database.statement_timeout_ms = {{ $c.database.statementTimeoutMs | int64 }}
database.change_retention_seconds = {{ $c.database.changeRetentionSeconds | int64 }}
database.migrate_on_start = {{ not .Values.migrations.enabled }}
cache.max_keys = {{ $c.cache.maxKeys | int64 }}
cache.max_tenants = {{ $c.cache.maxTenants | int64 }}
cache.ttl_seconds = {{ $c.cache.ttlSeconds | int64 }}
cache.negative_ttl_seconds = {{ $c.cache.negativeTtlSeconds | int64 }}
cache.max_negative = {{ $c.cache.maxNegative | int64 }}
cache.unknown_lookups_per_second = {{ $c.cache.unknownLookupsPerSecond | int64 }}
cache.max_staleness_seconds = {{ $c.cache.maxStalenessSeconds | int64 }}
cache.lookup_batch_max = {{ $c.cache.lookupBatchMax | int64 }}
cache.lookup_batches_in_flight = {{ $c.cache.lookupBatchesInFlight | int64 }}
shutdown_grace_seconds = {{ $c.shutdownGraceSeconds | int64 }}
management.max_in_flight = {{ $c.management.maxInFlight | int64 }}
management.timeout_ms = {{ $c.management.timeoutMs | int64 }}
envoy.header_prefix = {{ $c.envoy.headerPrefix | quote }}
{{- with $c.otlpEndpoint }}
otlp_endpoint = {{ . | toJson }}
{{- end }}
{{- with $c.otlpProtocol }}
otlp_protocol = {{ . | quote }}
{{- end }}
{{- with $c.console.signup }}
jwt.console.signup = {{ . | quote }}
{{- end }}
{{- if $c.console.requireVerifiedEmail }}
jwt.console.require_verified_email = true
{{- end }}
replicas.heartbeat_interval_ms = {{ $c.replicas.heartbeatIntervalMs | int64 }}
replicas.heartbeat_expiry_seconds = {{ $c.replicas.heartbeatExpirySeconds | int64 }}
rate_shares.exchange_interval_ms = {{ $c.rateShares.exchangeIntervalMs | int64 }}
rate_shares.max_cells = {{ $c.rateShares.maxCells | int64 }}
{{- with $c.extraToml }}

# config.extraToml
{{ . }}
{{- end }}
{{- range $c.jwt.issuers }}

[[jwt.issuers]]
{{- range $k, $v := . }}
{{ $k | toJson }} = {{ include "tollgate.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range .Values.secrets.previousPeppers }}

[[previous_peppers]]
version = {{ .version | int64 }}
secret = {{ .secret | toJson }}
{{- end }}
{{- end }}

{{/* The gRPC port the probes call. */}}
{{- define "tollgate.probePort" -}}
{{- if .Values.probes.grpcPort }}{{ .Values.probes.grpcPort | int64 }}{{ else }}{{ .Values.ports.grpc | int64 }}{{ end }}
{{- end }}

{{/* One probe; call with (dict "root" $ "probe" .Values.probes.x). */}}
{{- define "tollgate.probe" -}}
{{- $root := .root }}
{{- $p := .probe }}
{{- if eq $p.type "grpc" }}
grpc:
  port: {{ include "tollgate.probePort" $root }}
  service: {{ $p.service | quote }}
  {{- with $root.Values.probes.grpcMode }}
  mode: {{ . }}
  {{- end }}
{{- else }}
tcpSocket:
  port: grpc
{{- end }}
periodSeconds: {{ $p.periodSeconds }}
timeoutSeconds: {{ $p.timeoutSeconds }}
failureThreshold: {{ $p.failureThreshold }}
{{- with $p.successThreshold }}
successThreshold: {{ . }}
{{- end }}
{{- end }}

{{/* Container securityContext shared by the server and the migration Job. */}}
{{- define "tollgate.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tollgate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "tollgate.validate" -}}
{{- $s := .Values.secrets }}
{{- if and (not $s.existingSecret) (not (and $s.databaseUrl $s.pepper $s.operatorToken)) }}
{{- fail "secrets: set secrets.databaseUrl, secrets.pepper and secrets.operatorToken, or secrets.existingSecret naming a Secret you manage (helm/tollgate/README.md, Secrets). To lint or render the chart without them, use its test values: --values helm/tollgate/ci/minimal-values.yaml (ct lint does)" }}
{{- end }}
{{- if ge (add (int .Values.preStopSleepSeconds) (int .Values.config.shutdownGraceSeconds)) (int .Values.terminationGracePeriodSeconds) }}
{{- fail "terminationGracePeriodSeconds must be greater than preStopSleepSeconds + config.shutdownGraceSeconds, or Kubernetes kills calls still finishing" }}
{{- end }}
{{- if and $s.existingSecret (or $s.databaseUrl $s.pepper $s.operatorToken $s.gatewayToken $s.consoleBackendToken $s.forwardAuthSecret) }}
{{- fail "secrets: set secrets.existingSecret or secrets.databaseUrl/pepper/operatorToken/gatewayToken/consoleBackendToken/forwardAuthSecret, not both" }}
{{- end }}
{{- if and (not $s.existingSecret) (or $s.existingSecretHolds.gatewayToken $s.existingSecretHolds.consoleBackendToken $s.existingSecretHolds.forwardAuthSecret) }}
{{- fail "secrets.existingSecretHolds needs secrets.existingSecret (or give the tokens inline)" }}
{{- end }}
{{- $tokens := compact (list $s.operatorToken $s.gatewayToken $s.consoleBackendToken $s.forwardAuthSecret) }}
{{- if ne (len $tokens) (len (uniq $tokens)) }}
{{- fail "secrets: operatorToken, gatewayToken, consoleBackendToken and forwardAuthSecret must differ" }}
{{- end }}
{{- if and .Values.forwardAuth.enabled (has (int .Values.forwardAuth.port) (list (int .Values.ports.grpc) (int .Values.ports.metrics) (int .Values.service.grpcPort) (int .Values.service.metricsPort))) }}
{{- fail "forwardAuth.port must differ from the gRPC and metrics ports (ports.* and service.*)" }}
{{- end }}
{{- if and .Values.forwardAuth.enabled .Values.forwardAuth.requireGatewaySecret (not (include "tollgate.hasForwardAuthSecret" .)) }}
{{- fail "forwardAuth.enabled needs a gateway secret, or any pod reaching the port gets decisions: set secrets.forwardAuthSecret (or secrets.existingSecretHolds.forwardAuthSecret with secrets.existingSecret), or forwardAuth.requireGatewaySecret=false to rely on the NetworkPolicy alone" }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.existingSecret (or .Values.tls.cert .Values.tls.key .Values.tls.clientCa) }}
{{- fail "tls: set tls.existingSecret or tls.cert/key/clientCa, not both" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) .Values.tls.verifyClients (not .Values.tls.clientCa) }}
{{- fail "tls.verifyClients needs tls.clientCa (or a tls.existingSecret holding ca.crt)" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (eq (toString $pdb.maxUnavailable) "") (eq (toString $pdb.minAvailable) "") }}
{{- fail "podDisruptionBudget: set maxUnavailable or minAvailable" }}
{{- end }}
{{- if and $pdb.enabled (ne (toString $pdb.maxUnavailable) "") (ne (toString $pdb.minAvailable) "") }}
{{- fail "podDisruptionBudget: set maxUnavailable or minAvailable, not both" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be ≥ autoscaling.minReplicas" }}
{{- end }}
{{- if gt (int .Values.config.database.minConnections) (int .Values.config.database.maxConnections) }}
{{- fail "config.database.minConnections must be ≤ config.database.maxConnections" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $onGrpcPort := eq (include "tollgate.probePort" .) (toString (int64 .Values.ports.grpc)) }}
{{- range $name, $p := pick .Values.probes "startup" "readiness" "liveness" }}
{{- if and $p.enabled (eq $p.type "grpc") $onGrpcPort }}
{{- if ne $.Values.probes.grpcMode "TLS" }}
{{- fail (printf "probes.%s: a plaintext gRPC probe cannot reach the TLS gRPC port; set probes.%s.type=tcpSocket, or probes.grpcMode=TLS (Kubernetes >= 1.37)" $name $name) }}
{{- end }}
{{- if $.Values.tls.verifyClients }}
{{- fail (printf "probes.%s: with tls.verifyClients the kubelet's gRPC probe has no client certificate; set probes.%s.type=tcpSocket" $name $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A YAML value as a TOML value: maps become inline tables, lists arrays,
scalars their JSON form (which TOML reads the same for strings, numbers
and booleans).
*/}}
{{- define "tollgate.tomlValue" -}}
{{- if kindIs "map" . -}}
{ {{- $first := true -}}
{{- range $k, $v := . -}}
{{- if not $first }}, {{ else }} {{ end -}}
{{- $first = false -}}
{{ $k | toJson }} = {{ include "tollgate.tomlValue" $v }}
{{- end }} }
{{- else if kindIs "slice" . -}}
[{{- range $i, $v := . -}}{{- if $i }}, {{ end -}}{{ include "tollgate.tomlValue" $v }}{{- end -}}]
{{- else if kindIs "float64" . -}}
{{ . | int64 }}
{{- else -}}
{{ toJson . }}
{{- end -}}
{{- end -}}
