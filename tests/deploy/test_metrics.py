"""deploy/metrics.py: several processes write, one exporter merges (prometheus-client multiprocess)."""

import os
import subprocess
import sys
import textwrap
import urllib.request

from memserve.deploy import metrics as M
from prometheus_client.parser import text_string_to_metric_families

WRITER = textwrap.dedent("""
    import sys, time
    from types import SimpleNamespace
    from memserve.deploy.metrics import get_metrics, RequestRecorder, set_engine_gauges
    replica, n = sys.argv[1], int(sys.argv[2])
    api = "http" if replica == "rB" else "grpc"
    m = get_metrics()
    for i in range(n):
        r = RequestRecorder(m, "tiny", arrival=100.0, api=api)
        r.on_tokens(1, now=100.25)        # ttft 0.25
        r.on_tokens(2, now=100.27)        # two tokens, 10 ms each
        r.finish("length", prompt_tokens=5, queue_time=0.05, now=101.0)
    m.request_errors.labels("INVALID_ARGUMENT", api).inc()
    set_engine_gauges(m, "tiny", replica, SimpleNamespace(num_running=n, num_waiting=1, kv_cache_usage_perc=0.5,
                      num_free_blocks=10, kv_memory_bytes={"device": 1000, "host": 7}, sessions_active=2))
    if len(sys.argv) > 3:
        print("ready", flush=True); time.sleep(60)
""")


def _samples(text: bytes) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_multiprocess_merge_and_dead_gauges(tmp_path):
    d = str(tmp_path)
    env = {**os.environ, M.MULTIPROC_ENV: d}
    subprocess.run([sys.executable, "-c", WRITER, "rA", "3"], env=env, check=True, timeout=60)
    live = subprocess.Popen([sys.executable, "-c", WRITER, "rB", "2", "stay"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "ready"
        s = _samples(M.render(d))
        G, H = ("api", "grpc"), ("api", "http")  # rA wrote 3 gRPC requests, rB 2 HTTP ones
        assert s[("memserve:request_success_total", (G, ("finish_reason", "length"), ("model_name", "tiny")))] == 3
        assert s[("memserve:request_success_total", (H, ("finish_reason", "length"), ("model_name", "tiny")))] == 2
        assert s[("memserve:generation_tokens_total", (G, ("model_name", "tiny")))] == 9
        assert s[("memserve:generation_tokens_total", (H, ("model_name", "tiny")))] == 6
        assert s[("memserve:prompt_tokens_total", (G, ("model_name", "tiny")))] == 15
        assert s[("memserve:prompt_tokens_total", (H, ("model_name", "tiny")))] == 10
        assert s[("memserve:request_errors_total", (G, ("code", "INVALID_ARGUMENT")))] == 1
        assert s[("memserve:request_errors_total", (H, ("code", "INVALID_ARGUMENT")))] == 1
        assert s[("memserve:time_to_first_token_seconds_count", (G, ("model_name", "tiny")))] == 3
        assert s[("memserve:time_to_first_token_seconds_bucket", (H, ("le", "0.1"), ("model_name", "tiny")))] == 0
        assert s[("memserve:time_to_first_token_seconds_bucket", (H, ("le", "0.25"), ("model_name", "tiny")))] == 2
        assert s[("memserve:inter_token_latency_seconds_count", (G, ("model_name", "tiny")))] == 6
        assert s[("memserve:inter_token_latency_seconds_bucket", (H, ("le", "0.01"), ("model_name", "tiny")))] == 4
        # the exited writer's gauges are gone, the live one's remain
        running = {k[1]: v for k, v in s.items() if k[0] == "memserve:num_requests_running"}
        assert running == {(("model_name", "tiny"), ("replica", "rB")): 2}
        assert s[("memserve:kv_memory_bytes", (("model_name", "tiny"), ("replica", "rB"), ("tier", "host")))] == 7
        # nothing but memserve:* is exported
        assert all(name.startswith("memserve:") for name, _ in s)
        # and over HTTP
        server, thread = M.start_exporter(d, port=0)
        try:
            port = server.server_address[1]
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            assert b"memserve:e2e_request_latency_seconds_count" in body
        finally:
            server.shutdown()
    finally:
        live.kill()
        live.wait(timeout=10)
