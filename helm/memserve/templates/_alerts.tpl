{{/*
The alert rules, with thresholds from .Values.monitoring.prometheusRule.thresholds. The one source
of memserve's alerts: deploy/alerts.yaml is this, rendered with the default values
(helm/sync_monitoring.py writes it; tests/helm checks it is current). Every rule carries a runbook.
`or vector(0)`: a ratio or rate of errors that never happened is 0, not "no data" (tests/helm checks
that every alert's measured side returns data on a healthy server).
*/}}
{{- define "memserve.alertGroups" -}}
{{- $t := .Values.monitoring.prometheusRule.thresholds -}}
{{- $name := include "memserve.name" . -}}
- name: memserve
  rules:
    - alert: MemServeHighTimeToFirstToken
      expr: histogram_quantile(0.99, sum by (le) (rate(memserve:time_to_first_token_seconds_bucket[5m]))) > {{ $t.ttftP99Seconds }}
      for: 5m
      labels: {severity: warning}
      annotations:
        summary: "p99 time to first token above {{ $t.ttftP99Seconds }} s for 5 minutes"
        description: "p99 TTFT is {{ "{{" }} $value | humanizeDuration {{ "}}" }}."
        runbook: "Requests wait for a batch slot or prefill is long. Check the queue panel; raise engine.replicas.max (autoscaling) or lower engine.engineArgs.max_num_seqs; long prompts: ingest them once into a session."
    - alert: MemServeHighInterTokenLatency
      expr: histogram_quantile(0.99, sum by (le) (rate(memserve:inter_token_latency_seconds_bucket[5m]))) > {{ $t.itlP99Seconds }}
      for: 5m
      labels: {severity: warning}
      annotations:
        summary: "p99 inter-token latency above {{ $t.itlP99Seconds }} s"
        description: "p99 ITL is {{ "{{" }} $value | humanizeDuration {{ "}}" }}."
        runbook: "Batches are too large for the hardware, or KV-memory retrieval is slow (long sessions). Lower max_num_seqs, add replicas, or give the engine more CPU/GPU (engine.resources, engine.gpus)."
    - alert: MemServeErrorRateHigh
      expr: |
        (sum(rate(memserve:request_errors_total{code!~"INVALID_ARGUMENT|NOT_FOUND|CANCELLED|DEADLINE_EXCEEDED"}[5m])) or vector(0))
          / clamp_min(sum(rate(memserve:request_success_total[5m])) + sum(rate(memserve:request_errors_total[5m])), 1e-9) > {{ $t.errorRatio }}
      for: 5m
      labels: {severity: critical}
      annotations:
        summary: "more than {{ mulf $t.errorRatio 100 }}% of requests fail server-side"
        description: "{{ "{{" }} $value | humanizePercentage {{ "}}" }} of requests end in INTERNAL / UNAVAILABLE / RESOURCE_EXHAUSTED."
        runbook: "Look at the errors-by-code panel. UNAVAILABLE: replicas are down or restarting (kubectl get pods); RESOURCE_EXHAUSTED: see MemServeBackpressure; INTERNAL: read the engine replica logs (kubectl logs -c ray-worker)."
    - alert: MemServeBackpressure
      expr: (sum(rate(memserve:request_errors_total{code="RESOURCE_EXHAUSTED"}[5m])) or vector(0)) > 0.1
      for: 10m
      labels: {severity: warning}
      annotations:
        summary: "requests rejected with RESOURCE_EXHAUSTED (queues full)"
        description: "{{ "{{" }} $value {{ "}}" }} rejections per second."
        runbook: "Replicas' waiting queues are full. Raise engine.replicas.max, or app.max_waiting if latency allows."
    - alert: MemServeKVCacheNearlyFull
      expr: max by (replica) (memserve:kv_cache_usage_perc) > {{ $t.kvUsage }}
      for: 10m
      labels: {severity: warning}
      annotations:
        summary: "KV cache of replica {{ "{{" }} $labels.replica {{ "}}" }} above {{ mulf $t.kvUsage 100 }}% for 10 minutes"
        description: "Requests will be preempted or queue."
        runbook: "Add KV blocks (engine.engineArgs.num_kv_blocks / kv_cache_bytes with more memory in engine.resources) or replicas."
    - alert: MemServeMemoryTierNearlyFull
      expr: max by (replica) (memserve:kv_memory_bytes{tier="memory"}) > {{ int64 $t.memoryTierBytes }}
      for: 10m
      labels: {severity: warning}
      annotations:
        summary: "KV-memory tier of replica {{ "{{" }} $labels.replica {{ "}}" }} above {{ int64 $t.memoryTierBytes }} bytes"
        description: "{{ "{{" }} $value | humanize1024 {{ "}}" }}B of compressed KV memory (long contexts and sessions) on one replica."
        runbook: "Set memoryTierBytes below the pod's memory limit minus model and KV pool. Delete idle sessions (DeleteSession), raise engine.resources.limits.memory, or add replicas so sessions spread out."
    - alert: MemServeRequestsWaiting
      expr: sum(memserve:num_requests_waiting) > {{ $t.queueDepth }}
      for: 5m
      labels: {severity: warning}
      annotations:
        summary: "more than {{ $t.queueDepth }} requests waiting"
        description: "{{ "{{" }} $value {{ "}}" }} requests wait for a batch slot across replicas."
        runbook: "Sustained queueing: raise engine.replicas.max or engine.targetOngoingRequests lower so autoscaling adds replicas sooner."
    - alert: MemServeReplicaRestarts
      expr: sum by (pod) (increase(kube_pod_container_status_restarts_total{pod=~"{{ $name }}-.*"}[1h])) > {{ $t.replicaRestartsPerHour }}
      for: 0m
      labels: {severity: warning}
      annotations:
        summary: "pod {{ "{{" }} $labels.pod {{ "}}" }} restarted more than {{ $t.replicaRestartsPerHour }} times in an hour"
        description: "From kube-state-metrics' restart counter."
        runbook: "kubectl describe pod / kubectl logs --previous. OOMKilled: raise engine.resources.limits.memory or lower the KV pool; a crash at start: check the model path (values: model) and the image."
    - alert: MemServeMetricsAbsent
      expr: absent(memserve:num_requests_running)
      for: 5m
      labels: {severity: critical}
      annotations:
        summary: "no memserve engine replica reports metrics"
        description: "The metrics exporters report no live engine replica."
        runbook: "The server is down or replicas crash-loop: kubectl get rayservice,pods; check the serve application status in the Ray dashboard (port 8265 on the head)."
{{- end -}}
