"""deploy/metrics.py: several processes write, one exporter merges (prometheus-client multiprocess)."""

import json
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


def _le(bound: float) -> str:
    """A bucket bound as the exposition text writes it (prometheus_client's floatToGoString)."""
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


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


SHARD_WRITER = textwrap.dedent("""
    import numpy as np, torch
    from memserve.deploy.metrics import get_metrics
    from memserve.deploy.remote_value_store import MemoryShardUnavailableError, RemoteValueStore

    table = torch.arange(12.0).view(4, 3)
    class Ok:  # handle-shaped: .lookup.remote(i, w).result(timeout_s=)
        def __init__(self): self.lookup = self
        def remote(self, i, w):
            out = (table[torch.as_tensor(i).long()] * torch.as_tensor(w)[..., None]).sum(1).numpy()
            return type("R", (), {"result": lambda self, timeout_s=None: out})()
    class Down(Ok):
        def remote(self, i, w):
            def fail(self, timeout_s=None): raise TimeoutError("no replica")
            return type("R", (), {"result": fail})()
    m = get_metrics()
    ok = RemoteValueStore("t", [Ok()], ["MemoryShard-t0-0of1"], "columns", 4, 3, metrics=m)
    idx, w = torch.tensor([[0, 3]]), torch.tensor([[0.5, 0.5]])
    assert torch.equal(ok.lookup(idx, w), torch.tensor([[4.5, 5.5, 6.5]]))
    down = RemoteValueStore("t", [Down()], ["MemoryShard-t0-0of1x"], "columns", 4, 3, metrics=m,
                            retry_timeout_s=0.3, call_timeout_s=0.1, backoff_s=0.05)
    try:
        down.lookup(idx, w)
        raise SystemExit("expected MemoryShardUnavailableError")
    except MemoryShardUnavailableError as e:
        assert "MemoryShard-t0-0of1x" in str(e)
""")


def test_memory_shard_metrics_are_exported(tmp_path):
    """RemoteValueStore(metrics=...) records latency, bytes and failures per shard (issue 17)."""
    d = str(tmp_path)
    subprocess.run([sys.executable, "-c", SHARD_WRITER], env={**os.environ, M.MULTIPROC_ENV: d}, check=True, timeout=60)
    s = _samples(M.render(d))
    ok, down = ("shard", "MemoryShard-t0-0of1"), ("shard", "MemoryShard-t0-0of1x")
    assert s[("memserve:memory_shard_lookup_seconds_count", (ok,))] == 1
    # sent: 2 int32 indices + 2 fp32 weights = 16 B; received: 3 fp32 = 12 B
    assert s[("memserve:memory_shard_bytes_total", (ok,))] == 28
    assert s[("memserve:memory_shard_failures_total", (down,))] == 1
    assert ("memserve:memory_shard_failures_total", (ok,)) not in s


MEMORY_WRITER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    from pathlib import Path
    from memserve.deploy.metrics import get_metrics
    from memserve.deploy.worker import EngineWorker
    from memserve.runtime import LLM, SamplingParams
    from tiny_models import make_tiny_memory_model
    d = make_tiny_memory_model(Path(sys.argv[1]) / "m", mode="parallel", seed=3, with_tokenizer=False)
    llm = LLM(str(d), progress=False, num_kv_blocks=32)
    model = llm.engine.model
    reads = []  # every read's (layer, seconds) as the engine records it: the test's reference histogram
    from memserve.runtime.ffn import LookupStats
    record = LookupStats.record
    LookupStats.record = lambda self, layer, sec: (reads.append((layer, sec)), record(self, layer, sec))[1]
    worker = EngineWorker(llm.engine, model_name="tiny-mem", replica="r0", metrics=get_metrics())
    worker.update_gauges()  # before any lookup: the counters are exported at 0
    llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    worker.update_gauges()
    worker.update_gauges()  # no new lookups: no double counting
    llm.generate([[9, 10]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
    worker.update_gauges()  # the per-layer histogram again: only the new reads are added
    print(json.dumps({"layers": sorted(model.memory_layers), "reads": reads,
                      "seconds_total": model.lookup_stats.lookup_seconds_total}))
""")


def test_memory_lookup_counters_from_a_real_memory_model(tmp_path):
    """memserve:memory_lookups_total / memserve:memory_lookup_seconds_total (all memory layers of the replica
    together) and the per-layer histogram memserve:memory_lookup_read_seconds in the exposition text, fed
    from a real tiny memory model's engine stats by EngineWorker."""
    from pathlib import Path

    d = tmp_path / "prom"
    d.mkdir()
    env = {**os.environ, M.MULTIPROC_ENV: str(d), "OMP_NUM_THREADS": "1"}
    tests_dir = str(Path(__file__).resolve().parents[1])
    # cwd: `python -c` puts its cwd on sys.path, and the checkout root's kernels/ would shadow the hub `kernels`
    # package that transformers >= 5.25 imports (see tests/conftest.py)
    r = subprocess.run([sys.executable, "-c", MEMORY_WRITER, str(tmp_path), tests_dir], env=env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.splitlines()[-1])
    text = M.render(str(d))
    assert b"# TYPE memserve:memory_lookups_total counter" in text or b"# TYPE memserve:memory_lookups counter" in text
    s = _samples(text)
    label = (("model_name", "tiny-mem"),)
    # one read per memory layer per model step, whichever decode step runs it (Model.forward, the eager or the
    # native C++ step): 5 steps (prefill + 4 decode steps), then 3, x 2 memory layers; updates in between: no
    # double counting
    assert len(info["layers"]) == 2 and len(info["reads"]) == (5 + 3) * 2 == 16
    assert s[("memserve:memory_lookups_total", label)] == 16
    got = s[("memserve:memory_lookup_seconds_total", label)]
    assert 0 < got and abs(got - info["seconds_total"]) < 1e-9
    # memserve:memory_lookup_read_seconds{layer}: a histogram per memory layer, equal to one built here from
    # every read's seconds (the second update adds only the second generate's reads)
    assert b"# TYPE memserve:memory_lookup_read_seconds histogram" in text
    for layer in info["layers"]:
        secs = [t for i, t in info["reads"] if i == layer]
        lab = {"model_name": "tiny-mem", "layer": str(layer)}
        assert len(secs) == 5 + 3
        assert s[("memserve:memory_lookup_read_seconds_count", tuple(sorted(lab.items())))] == len(secs)
        assert abs(s[("memserve:memory_lookup_read_seconds_sum", tuple(sorted(lab.items())))] - sum(secs)) < 1e-9
        for le in [*M.LOOKUP_SECONDS_BUCKETS, float("inf")]:
            key = ("memserve:memory_lookup_read_seconds_bucket", tuple(sorted({**lab, "le": _le(le)}.items())))
            assert s[key] == sum(t <= le for t in secs), (layer, le)
