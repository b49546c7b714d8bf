{{/* Names and labels (the usual chart conventions). */}}
{{- define "peersync.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "peersync.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "peersync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "peersync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The two Helm bookkeeping labels are on lines of their own: the plain manifest leaves them out. */}}
{{- define "peersync.labels" -}}
{{ include "peersync.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "peersync.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Paths and addresses, all derived from the daemon's config (values `config`). */}}
{{- define "peersync.socketDir" -}}
{{- dir .Values.config.socket -}}
{{- end -}}

{{- define "peersync.mirrorURL" -}}
{{- $listen := .Values.config.mirror.listen | default "127.0.0.1:5380" -}}
{{- printf "http://%s" (regexReplaceAll "^(0\\.0\\.0\\.0|\\[::\\])?:" $listen "127.0.0.1:") -}}
{{- end -}}

{{- define "peersync.peerPort" -}}
{{- regexFind "[0-9]+$" (.Values.config.peer.listen | default "0.0.0.0:5381") -}}
{{- end -}}

{{- define "peersync.hostPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .base) .name -}}
{{- end -}}

{{/*
TOML for the daemon's config, from a map: plain keys first, then the sub-tables, keys sorted.
Helm's own toToml writes whole numbers as floats (values are JSON numbers), e.g. chunk_size =
1.048576e+06, which the daemon rejects; here a whole number is written as an integer (the daemon
takes an integer where it wants a float).
*/}}
{{- define "peersync.toml" -}}
{{- $path := .path -}}
{{- range $key, $value := .table -}}
{{- if and (not (kindIs "map" $value)) (not (kindIs "invalid" $value)) }}
{{ include "peersync.tomlKey" $key }} = {{ include "peersync.tomlValue" $value }}
{{- end -}}
{{- end -}}
{{- range $key, $value := .table -}}
{{- if kindIs "map" $value -}}
{{- $sub := append $path $key }}

[{{ range $i, $k := $sub }}{{ if $i }}.{{ end }}{{ include "peersync.tomlKey" $k }}{{ end }}]
{{- include "peersync.toml" (dict "path" $sub "table" $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "peersync.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "peersync.tomlValue" -}}
{{- if kindIs "string" . -}}
{{ toJson . }}
{{- else if kindIs "bool" . -}}
{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- if eq (float64 .) (float64 (int64 .)) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if kindIs "slice" . -}}
[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "peersync.tomlValue" $e }}{{ end }}]
{{- else -}}
{{- fail (printf "config: a %s cannot be written as TOML here" (kindOf .)) -}}
{{- end -}}
{{- end -}}

{{/* The readiness/liveness check; (dict "root" $ "timeout" seconds). */}}
{{- define "peersync.probe" -}}
{{- $v := .root.Values -}}
{{- if eq $v.probes.type "http" -}}
httpGet:
  host: 127.0.0.1
  port: {{ $v.probes.http.port }}
  path: {{ $v.probes.http.path }}
{{- else if eq $v.probes.type "socket" -}}
exec:
  command:
    - python3
    - -c
    - |
      # A unary gRPC call on the daemon's socket: any status is an answer, none in time is not.
      import grpc, sys
      channel = grpc.insecure_channel("unix://{{ $v.config.socket }}")
      info = channel.unary_unary("/containerd.services.content.v1.Content/Info")
      try:
          info(b"", timeout={{ sub .timeout 2 }})
      except grpc.RpcError as exc:
          if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
              sys.exit(f"peersync daemon not answering: {exc.code().name}")
{{- else -}}
{{- fail "probes.type: socket or http" -}}
{{- end -}}
{{- end -}}
