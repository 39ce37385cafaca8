{{/* Names ----------------------------------------------------------------------------------- */}}

{{- define "ulmfit-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's object name prefix: the release name, plus the chart name unless contained. */}}
{{- define "ulmfit-operator.fullname" -}}
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

{{- define "ulmfit-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ulmfit-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels ---------------------------------------------------------------------------------- */}}

{{- define "ulmfit-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ulmfit-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "ulmfit-operator.labels" -}}
app.kubernetes.io/name: {{ include "ulmfit-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ulmfit-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The operator image: by digest when one is given, else by tag (default: appVersion). */}}
{{- define "ulmfit-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* `rbac.scope: namespace` watches exactly one namespace (validateValues enforces it). */}}
{{- define "ulmfit-operator.watchNamespace" -}}
{{- if eq .Values.rbac.scope "namespace" -}}
{{- first .Values.watchNamespaces -}}
{{- end -}}
{{- end -}}

{{/* What jobs may name ------------------------------------------------------------------ */}}

{{/* The operator's --allowed-s3-endpoints: allowedS3Endpoints, else s3.endpoint, else `*`. */}}
{{- define "ulmfit-operator.allowedS3Endpoints" -}}
{{- if .Values.allowedS3Endpoints -}}
{{- join "," .Values.allowedS3Endpoints -}}
{{- else -}}
{{- .Values.s3.endpoint | default "*" -}}
{{- end -}}
{{- end -}}

{{/*
The whole-string RE2 expression of one allowedTrainerImages pattern, as ulmfit_operator/policy.py
builds it: `PREFIX*` any image starting with PREFIX; a pattern with an `@digest` or a `:tag` in
its last path segment exactly that image; else a repository, with any tag and/or digest (the OCI
reference grammar's).
*/}}
{{- define "ulmfit-operator.imageRegex" -}}
{{- if hasSuffix "*" . -}}
^{{ trimSuffix "*" . | regexQuoteMeta }}.*$
{{- else if or (contains "@" .) (contains ":" (splitList "/" . | last)) -}}
^{{ regexQuoteMeta . }}$
{{- else -}}
^{{ regexQuoteMeta . }}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$
{{- end -}}
{{- end -}}

{{/* One allowedTrainerImages pattern for people: a repository as `REPOSITORY[:TAG][@DIGEST]`. */}}
{{- define "ulmfit-operator.imagePatternText" -}}
{{- if or (hasSuffix "*" .) (contains "@" .) (contains ":" (splitList "/" . | last)) -}}
{{- . -}}
{{- else -}}
{{- printf "%s[:TAG][@DIGEST]" . -}}
{{- end -}}
{{- end -}}

{{/* Validation ------------------------------------------------------------------------------ */}}

{{/*
Fails the render with one message per problem: value combinations that a JSON schema cannot
express and that would otherwise install an operator that cannot work.
*/}}
{{- define "ulmfit-operator.validateValues" -}}
{{- $problems := list -}}
{{- $v := .Values -}}
{{- if and $v.standalone (gt (int $v.replicas) 1) -}}
{{- $problems = append $problems (printf "replicas is %d but standalone is true: standalone skips leader election, so every replica would reconcile the same jobs. Set standalone: false (replicas then elect a leader) or replicas: 1." (int $v.replicas)) -}}
{{- end -}}
{{- if eq $v.rbac.scope "namespace" -}}
{{- if not $v.watchNamespaces -}}
{{- $problems = append $problems "rbac.scope is namespace but watchNamespaces is empty: name the namespace whose ULMFiTJobs the operator reconciles (its Role goes there), or use rbac.scope: cluster." -}}
{{- else if gt (len $v.watchNamespaces) 1 -}}
{{- $problems = append $problems (printf "rbac.scope is namespace and watchNamespaces has %d entries (%s): the operator watches one namespace (ulmfit operator --namespace) or all of them (rbac.scope: cluster, watchNamespaces: [])." (len $v.watchNamespaces) (join ", " $v.watchNamespaces)) -}}
{{- end -}}
{{- else if $v.watchNamespaces -}}
{{- $problems = append $problems (printf "watchNamespaces is set (%s) but rbac.scope is cluster, which watches every namespace: set rbac.scope: namespace to watch only that one, or clear watchNamespaces." (join ", " $v.watchNamespaces)) -}}
{{- end -}}
{{- if and $v.s3.endpoint (not $v.s3.credentialsSecret.name) -}}
{{- $problems = append $problems (printf "s3.endpoint is %q but s3.credentialsSecret.name is empty: the operator reads progress.json and checkpoints from that store and needs a Secret with its keys (%s, %s)." $v.s3.endpoint $v.s3.credentialsSecret.accessKeyIdKey $v.s3.credentialsSecret.secretAccessKeyKey) -}}
{{- end -}}
{{- if and $v.podDisruptionBudget.enabled (lt (int $v.replicas) 2) -}}
{{- $problems = append $problems (printf "podDisruptionBudget.enabled with replicas %d: a budget that keeps the only replica up blocks every node drain. Set replicas >= 2 or disable the budget." (int $v.replicas)) -}}
{{- end -}}
{{- if and $v.podDisruptionBudget.enabled (not (kindIs "string" $v.podDisruptionBudget.minAvailable)) (ge (int $v.podDisruptionBudget.minAvailable) (int $v.replicas)) -}}
{{- $problems = append $problems (printf "podDisruptionBudget.minAvailable %d is not below replicas %d: no replica could ever be evicted." (int $v.podDisruptionBudget.minAvailable) (int $v.replicas)) -}}
{{- end -}}
{{- if eq (int $v.metricsPort) (int $v.healthPort) -}}
{{- $problems = append $problems (printf "metricsPort and healthPort are both %d: they are two servers and need two ports." (int $v.metricsPort)) -}}
{{- end -}}
{{- if le (float64 $v.resyncSeconds) 0.0 -}}
{{- $problems = append $problems (printf "resyncSeconds is %v: the operator needs a positive interval between resyncs." $v.resyncSeconds) -}}
{{- end -}}
{{- if lt (float64 $v.leaseDuration) 1.0 -}}
{{- $problems = append $problems (printf "leaseDuration is %v: a Lease holds for whole seconds, at least 1." $v.leaseDuration) -}}
{{- end -}}
{{- if and (not $v.rbac.create) (not $v.serviceAccount.create) (not $v.serviceAccount.name) -}}
{{- $problems = append $problems "serviceAccount.create and rbac.create are false but serviceAccount.name is empty: name the existing ServiceAccount that holds the operator's rights." -}}
{{- end -}}
{{- if $problems -}}
{{- fail (printf "\n\nulmfit-operator: invalid values:\n  - %s\n" (join "\n  - " $problems)) -}}
{{- end -}}
{{- end -}}
