{{/*
Object names are <release>-<component> (truncated so that the longest, a registry pod's
controller-revision-hash label, stays within 63 characters).
*/}}
{{- define "meshbridge.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshbridge.gatewayName" -}}
{{- printf "%s-gateway" (include "meshbridge.fullname" .) -}}
{{- end -}}

{{- define "meshbridge.adapterName" -}}
{{- printf "%s-kube-adapter" (include "meshbridge.fullname" .) -}}
{{- end -}}

{{- define "meshbridge.registryName" -}}
{{- printf "%s-registry" (include "meshbridge.fullname" .) -}}
{{- end -}}

{{/* Common labels; call with (dict "root" $ "component" "gateway"). */}}
{{- define "meshbridge.labels" -}}
{{ include "meshbridge.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | toString | replace "+" "_" | trunc 63 | quote }}
app.kubernetes.io/part-of: meshbridge
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 }}
{{- end -}}

{{- define "meshbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "meshbridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{/* Required values. */}}
{{- define "meshbridge.site" -}}
{{- required "site.name is required: this cluster's site, a DNS label (e.g. --set site.name=east)" .Values.site.name -}}
{{- end -}}

{{- define "meshbridge.trustDomain" -}}
{{- required "trustDomain is required: the SPIFFE trust domain (e.g. --set trustDomain=corp.example)" .Values.trustDomain -}}
{{- end -}}

{{/* The registry URLs the gateways and the adapter use, as a JSON (and TOML) array. */}}
{{- define "meshbridge.registryURLs" -}}
{{- $urls := list -}}
{{- if .Values.registry.enabled -}}
{{- $name := include "meshbridge.registryName" . -}}
{{- range $i := until (int .Values.registry.replicas) -}}
{{- $urls = append $urls (printf "https://%s-%d.%s.%s.svc:%d" $name $i $name $.Release.Namespace (int $.Values.registry.port)) -}}
{{- end -}}
{{- else -}}
{{- $urls = .Values.registry.urls -}}
{{- if empty $urls -}}
{{- $_ := required "registry.urls is required when registry.enabled is false: the external registry's URLs (e.g. --set 'registry.urls={https://registry.example:7443}'), or set registry.enabled=true for the bundled registry" "" -}}
{{- end -}}
{{- end -}}
{{- toJson $urls -}}
{{- end -}}

{{/* Where the certificates are mounted, and the Secrets holding them. */}}
{{- define "meshbridge.tlsDir" -}}/etc/meshbridge/tls{{- end -}}

{{- define "meshbridge.gatewaySecret" -}}
{{- .Values.certificates.gateway.secretName | default (printf "%s-tls" (include "meshbridge.gatewayName" .)) -}}
{{- end -}}

{{- define "meshbridge.adapterSecret" -}}
{{- .Values.certificates.adapter.secretName | default (printf "%s-tls" (include "meshbridge.adapterName" .)) -}}
{{- end -}}

{{/* The Secret of registry pod <ordinal>; call with (list $ ordinal). */}}
{{- define "meshbridge.registrySecret" -}}
{{- $root := index . 0 -}}
{{- $prefix := $root.Values.certificates.registry.secretNamePrefix | default (include "meshbridge.registryName" $root) -}}
{{- printf "%s-%d-tls" $prefix (int (index . 1)) -}}
{{- end -}}

{{/* The [tls] section of a config file, for files under `dir`. */}}
{{- define "meshbridge.tlsSection" -}}
[tls]
cert = {{ printf "%s/tls.crt" . | toJson }}
key = {{ printf "%s/tls.key" . | toJson }}
bundle = {{ printf "%s/ca.crt" . | toJson }}
{{- end -}}

{{/* SPIFFE ids. */}}
{{- define "meshbridge.gatewayID" -}}
{{- printf "spiffe://%s/site/%s/gateway" (include "meshbridge.trustDomain" .) (include "meshbridge.site" .) -}}
{{- end -}}

{{- define "meshbridge.adapterID" -}}
{{- printf "spiffe://%s/site/%s/adapter" (include "meshbridge.trustDomain" .) (include "meshbridge.site" .) -}}
{{- end -}}

{{/* A pod's grace period: the drain deadline (ms), rounded up to seconds, plus 15 s. */}}
{{- define "meshbridge.gracePeriod" -}}
{{- add (div (add (int64 .) 999) 1000) 15 -}}
{{- end -}}

{{/* Pod-level settings shared by every workload; call with (dict "root" $ "role" .Values.gateway). */}}
{{- define "meshbridge.podCommon" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- with .root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container-level settings shared by every container. */}}
{{- define "meshbridge.containerCommon" -}}
image: {{ include "meshbridge.image" .root }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
{{- with .root.Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A cert-manager Certificate; call with (dict "root" $ "name" .. "component" .. "secretName" .. "uri" ..). */}}
{{- define "meshbridge.certificate" -}}
{{- $cm := .root.Values.certificates.certManager -}}
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "meshbridge.labels" (dict "root" .root "component" .component) | nindent 4 }}
spec:
  secretName: {{ .secretName }}
  secretTemplate:
    labels:
      {{- include "meshbridge.labels" (dict "root" .root "component" .component) | nindent 6 }}
  uris:
    - {{ .uri }}
  duration: {{ $cm.duration }}
  renewBefore: {{ $cm.renewBefore }}
  privateKey:
    algorithm: ECDSA
    size: 256
    encoding: PKCS8
    rotationPolicy: Always
  usages:
    - digital signature
    - server auth
    - client auth
  issuerRef:
    name: {{ required "certificates.certManager.issuerRef.name is required when certificates.certManager.enabled is true" $cm.issuerRef.name }}
    kind: {{ $cm.issuerRef.kind }}
    group: {{ $cm.issuerRef.group }}
{{- end -}}
