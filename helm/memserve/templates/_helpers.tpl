{{/* Name of the RayService and prefix of every object: nameOverride or the release name. */}}
{{- define "memserve.name" -}}
{{- $n := default .Release.Name .Values.nameOverride -}}
{{- if gt (len $n) 47 -}}
{{- fail (printf "name %q is %d characters; KubeRay allows at most 47 (set nameOverride)" $n (len $n)) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{- define "memserve.labels" -}}
app.kubernetes.io/name: memserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "memserve.selector" -}}
app.kubernetes.io/name: memserve
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "memserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* Restricted Pod Security Standard for every container. */}}
{{- define "memserve.containerSecurity" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
runAsUser: 1000
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "memserve.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The metrics exporter sidecar: every Ray pod serves the replicas' multiprocess metrics. */}}
{{- define "memserve.exporter" -}}
- name: metrics-exporter
  image: {{ include "memserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python", "-m", "memserve.deploy.metrics", "--dir", "/tmp/memserve-metrics", "--port", "{{ .Values.metricsPort }}", "--addr", "0.0.0.0"]
  ports:
    - {name: metrics, containerPort: {{ .Values.metricsPort }}, protocol: TCP}
  resources:
    requests: {cpu: 50m, memory: 64Mi}
    limits: {cpu: 200m, memory: 128Mi}
  securityContext:
    {{- include "memserve.containerSecurity" . | nindent 4 }}
  volumeMounts:
    - {name: metrics, mountPath: /tmp/memserve-metrics}
{{- end -}}

{{/* The TLS sidecar of the head pod (tls.enabled): nginx terminating TLS on tls.port (gRPC) and
tls.httpPort (the OpenAI API), passing both to Serve's plaintext proxies on localhost
(templates/tls-configmap.yaml). */}}
{{- define "memserve.tlsProxy" -}}
{{- if .Values.tls.enabled }}
- name: tls-proxy
  image: {{ .Values.tls.image.repository }}:{{ .Values.tls.image.tag }}
  imagePullPolicy: {{ .Values.tls.image.pullPolicy }}
  command: ["nginx", "-c", "/etc/memserve/nginx/nginx.conf", "-e", "stderr", "-g", "daemon off;"]
  ports:
    - {name: grpc-tls, containerPort: {{ .Values.tls.port }}, protocol: TCP}
    - {name: https-tls, containerPort: {{ .Values.tls.httpPort }}, protocol: TCP}
  readinessProbe:
    tcpSocket: {port: grpc-tls}
    periodSeconds: 10
  resources:
    {{- toYaml .Values.tls.resources | nindent 4 }}
  securityContext:
    {{- include "memserve.containerSecurity" . | nindent 4 }}
  volumeMounts:
    - {name: tls-cert, mountPath: /etc/memserve/tls, readOnly: true}
    - {name: tls-nginx, mountPath: /etc/memserve/nginx, readOnly: true}
    - {name: tls-tmp, mountPath: /tmp}
{{- end }}
{{- end -}}

{{- define "memserve.tlsVolumes" -}}
{{- if .Values.tls.enabled }}
- name: tls-cert
  secret:
    secretName: {{ .Values.tls.secretName }}
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
- name: tls-nginx
  configMap:
    name: {{ include "memserve.name" . }}-tls-nginx
- name: tls-tmp
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* Volumes and mounts shared by the Ray containers. */}}
{{- define "memserve.volumes" -}}
- name: metrics
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if .Values.auth.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ .Values.auth.existingSecret }}
    items:
      - {key: {{ .Values.auth.secretKey }}, path: api-keys}
{{- end }}
{{- if .Values.sessions.persistence.enabled }}
- name: sessions
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-sessions" (include "memserve.name" .)) .Values.sessions.persistence.existingClaim }}
{{- end }}
{{- end -}}

{{- define "memserve.mounts" -}}
- {name: metrics, mountPath: /tmp/memserve-metrics}
- {name: tmp, mountPath: /tmp/ray}
{{- if .Values.auth.existingSecret }}
- {name: api-keys, mountPath: /etc/memserve/auth, readOnly: true}
{{- end }}
{{- if .Values.sessions.persistence.enabled }}
- {name: sessions, mountPath: {{ .Values.sessions.persistence.mountPath }}}
{{- end }}
{{- end -}}

{{- define "memserve.env" -}}
- {name: PROMETHEUS_MULTIPROC_DIR, value: /tmp/memserve-metrics}
{{- /* deploy/app.py SERVE_ENV (read by every Serve process at import; tests/helm/test_chart.py keeps them equal) */}}
- {name: RAY_SERVE_THROUGHPUT_OPTIMIZED, value: "1"}
- {name: RAY_worker_niceness, value: "0"}
- {name: RAY_SERVE_PROXY_USE_GRPC, value: "1"}
- {name: RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, value: "2147483647"}
{{- if .Values.auth.existingSecret }}
- {name: MEMSERVE_API_KEYS_FILE, value: /etc/memserve/auth/api-keys}
{{- end }}
{{- if .Values.sessions.persistence.enabled }}
- {name: MEMSERVE_SESSION_DIR, value: {{ .Values.sessions.persistence.mountPath }}}
{{- end }}
{{- end -}}

{{/* CPU count of a Kubernetes quantity ("2", "1500m", 2) for the engine's torch threads. */}}
{{- define "memserve.cpuCount" -}}
{{- $s := toString . -}}
{{- if hasSuffix "m" $s -}}{{- max 1 (div (atoi (trimSuffix "m" $s)) 1000) -}}{{- else -}}{{- max 1 (int (float64 $s)) -}}{{- end -}}
{{- end -}}
