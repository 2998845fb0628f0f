{{/*
Release-scoped base name, at most 52 characters. Object names add suffixes
(up to "-snapshot-controller", 20 more): most objects take names of up to
253 characters, but a Service's is a DNS label of at most 63, which
csi-snap.snapshotMetadataService cuts to.
*/}}
{{- define "csi-snap.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of the csi-snapshot-metadata sidecar's Service (at most 63). */}}
{{- define "csi-snap.snapshotMetadataService" -}}
{{- printf "%s-snapshot-metadata" (include "csi-snap.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "csi-snap.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
Fails when node.podLabels sets a label the chart puts on its pods: it would
be rendered twice into one mapping, which no YAML parser accepts (and the
selector ones would no longer match the DaemonSets' selectors).
*/}}
{{- define "csi-snap.checkPodLabels" -}}
{{- $own := include "csi-snap.labels" . | fromYaml -}}
{{- $_ := set $own "app.kubernetes.io/component" "" -}}
{{- range $k, $v := .Values.node.podLabels -}}
{{- if hasKey $own $k -}}
{{- fail (printf "node.podLabels.%s: the chart sets that label on its pods itself (%s); choose another key" $k (keys $own | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component; call with (list $ "node"). */}}
{{- define "csi-snap.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ $.Chart.Name }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Name of the node plugin's ServiceAccount. */}}
{{- define "csi-snap.nodeServiceAccount" -}}
{{- default (printf "%s-node" (include "csi-snap.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{/* "repository:tag" of an image value ({repository, tag}). */}}
{{- define "csi-snap.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* Host directory of the plugin's CSI socket (kubelet looks for it there). */}}
{{- define "csi-snap.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.node.kubeletDir) .Values.driverName -}}
{{- end -}}

{{/*
Fails rendering when the VolumeSnapshot API is unknown, so a missing CRD is
reported by name instead of as an unmapped kind. Offline rendering passes
--api-versions snapshot.storage.k8s.io/v1.
*/}}
{{- define "csi-snap.requireSnapshotAPI" -}}
{{- if not (.Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1") -}}
{{- fail "the snapshot.storage.k8s.io/v1 API (VolumeSnapshot CRDs) is not installed: install the CRDs of github.com/kubernetes-csi/external-snapshotter (client/config/crd) first, or set volumeSnapshotClass.create=false and snapshotController.enabled=false; offline (helm template) add --api-versions snapshot.storage.k8s.io/v1" -}}
{{- end -}}
{{- end -}}

{{- define "csi-snap.requireGroupSnapshotAPI" -}}
{{- if not (.Capabilities.APIVersions.Has "groupsnapshot.storage.k8s.io/v1") -}}
{{- fail "volumeGroupSnapshots.enabled needs the groupsnapshot.storage.k8s.io/v1 API (VolumeGroupSnapshot CRDs of github.com/kubernetes-csi/external-snapshotter, client/config/crd): install them first; offline (helm template) add --api-versions groupsnapshot.storage.k8s.io/v1" -}}
{{- end -}}
{{- end -}}

{{/* Name of the TLS Secret of the csi-snapshot-metadata sidecar. */}}
{{- define "csi-snap.snapshotMetadataTLSSecret" -}}
{{- default (printf "%s-snapshot-metadata-tls" (include "csi-snap.fullname" .)) .Values.sidecars.snapshotMetadata.tlsSecretName -}}
{{- end -}}
