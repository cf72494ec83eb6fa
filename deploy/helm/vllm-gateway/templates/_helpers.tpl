{{/* Names and labels shared by every template. */}}

{{- define "vllm-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vllm-gateway.fullname" -}}
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

{{- define "vllm-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels common to every object; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "vllm-gateway.labels" -}}
helm.sh/chart: {{ include "vllm-gateway.chart" .ctx }}
{{ include "vllm-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: vllm-gateway
{{- end }}

{{- define "vllm-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-gateway.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "vllm-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vllm-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* A worker's StatefulSet and headless Service name; call with (dict "ctx" $ "m" $model). */}}
{{- define "vllm-gateway.workerName" -}}
{{- printf "%s-vllm-%s" (include "vllm-gateway.fullname" .ctx) .m.name | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/*
The gateway settings as rendered into the ConfigMap: .Values.config, with one DNS discovery
service per chart-deployed worker model (its headless Service) appended to
`discovery.services` (and the placeholder worker dropped then), the keys file of
apiKeys.existingSecret, and the chart's Redis as redis.url unless one is set.
*/}}
{{- define "vllm-gateway.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $discovery := default dict $config.discovery }}
{{- $services := list }}
{{- range $discovery.services }}
{{- $services = append $services . }}
{{- end }}
{{- if .Values.vllm.enabled }}
{{- range $m := .Values.vllm.models }}
{{- $name := include "vllm-gateway.workerName" (dict "ctx" $ "m" $m) }}
{{- $url := printf "http://%s.%s.svc.cluster.local:%d" $name $.Release.Namespace (int $.Values.vllm.port) }}
{{- $services = append $services (dict "url" $url "models" (list (default $m.model $m.servedModelName))) }}
{{- end }}
{{- end }}
{{- if and .Values.vllm.enabled (eq (toJson $config.workers) (toJson (list (dict "url" "http://vllm:8000")))) }}
{{- $_ := set $config "workers" list }}
{{- end }}
{{- if and .Values.vllm.enabled .Values.vllm.kvEvents.enabled }}
{{- $kv := .Values.vllm.kvEvents }}
{{- $routing := default dict $config.routing }}
{{- $wired := dict "enabled" true "endpoint" (printf "tcp://{host}:%d" (int $kv.port)) "replay_endpoint" (printf "tcp://{host}:%d" (int $kv.replayPort)) "topic" $kv.topic }}
{{- $_ := set $routing "kv_events" (mergeOverwrite (default dict $routing.kv_events) $wired) }}
{{- $_ := set $config "routing" $routing }}
{{- end }}
{{- if .Values.apiKeys.existingSecret }}
{{- $_ := set $config "auth" (merge (dict "keys_file" "/etc/vllm-gateway/keys/keys.yaml") (default dict $config.auth)) }}
{{- end }}
{{- if and .Values.redis.enabled (not (and $config.redis $config.redis.url)) }}
{{- $_ := set $config "redis" (merge (dict "url" (printf "redis://%s-redis:6379/0" (include "vllm-gateway.fullname" .))) (default dict $config.redis)) }}
{{- end }}
{{- if and (not $config.workers) (not $services) }}
{{- fail "no workers: list them in config.workers or config.discovery.services, or enable vllm with at least one model" }}
{{- end }}
{{- $_ := set $discovery "services" $services }}
{{- $_ := set $config "discovery" $discovery }}
{{- toYaml $config }}
{{- end }}

{{/* terminationGracePeriodSeconds: preStop + ceil(shutdown_grace + drain_timeout) + margin. */}}
{{- define "vllm-gateway.terminationGracePeriod" -}}
{{- $server := .Values.config.server }}
{{- $drain := ceil (addf $server.shutdown_grace $server.drain_timeout) | int }}
{{- add .Values.preStopSleepSeconds $drain .Values.terminationGraceMarginSeconds }}
{{- end }}

{{/* vLLM's --kv-events-config for the chart's workers: the sockets the gateway subscribes to. */}}
{{- define "vllm-gateway.kvEventsConfig" -}}
{{- dict "enable_kv_cache_events" true "publisher" "zmq" "endpoint" (printf "tcp://*:%d" (int .port)) "replay_endpoint" (printf "tcp://*:%d" (int .replayPort)) "topic" .topic | toJson }}
{{- end }}
