"""The real-Serve server of `bench/soak.py --serve` (a child process of the soak).

It starts a local Ray cluster (2 CPUs) and deploys the memserve app (`deploy/app.py`: Serve's gRPC
proxy -> MemServeIngress -> one MemServeEngine replica with the given model) as `memserve serve`
does, then writes one JSON line per second: the RSS of the engine replica, the ingress replica and
Serve's proxy (their pids from Ray's actor table, `serve_actor_pids`; RSS from /proc/PID/status,
all on this machine) and the engine's stats as a client sees them, through the GetModelInfo RPC
(free KV blocks, running / waiting, memory-tier bytes and active sessions from `extra`).
The stats come from a poller thread so a slow RPC under load never delays the RSS samples; each
line carries the stats of the last answer and its age.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

ROLES = ("engine", "ingress", "proxy")


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def stats_of(mi) -> dict:
    """The ModelInfo answer in the shape of EngineStats (what soak.py summarizes)."""
    ex = dict(mi.extra)
    return {"num_free_blocks": mi.num_free_blocks, "num_total_blocks": mi.num_total_blocks,
            "num_running": mi.num_running, "num_waiting": mi.num_waiting,
            "sessions_active": int(ex.get("sessions_active", 0)),
            "kv_memory_bytes": {k.split(".", 1)[1]: int(v) for k, v in ex.items() if k.startswith("kv_memory_bytes.")},
            "replica": ex.get("replica", "")}


def serve_ray(a) -> int:
    import grpc
    import ray
    from memserve.deploy import memserve_pb2 as pb
    from memserve.deploy import memserve_pb2_grpc as pbg
    from memserve.deploy.app import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, init_ray, serve_actor_pids, start
    from memserve.deploy.config import AppConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from serving_testlib import free_port

    # as the Ray-free soak: a deep waiting queue (16 streams must never see RESOURCE_EXHAUSTED) and
    # the soak's own deadline as the ingress's wait for the engine (errors and leaks, not latency)
    cfg = AppConfig(model=a.model, max_waiting=256, unavailable_timeout_s=a.timeout, engine_threads=a.threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the finally below stops Ray
    init_ray(num_cpus=2, log_to_driver=False, logging_level="ERROR")
    try:
        port = free_port()
        start(cfg, grpc_port=port, http_port=free_port())
        addr = f"127.0.0.1:{port}"
        stub = pbg.MemServeStub(grpc.insecure_channel(addr))
        deadline = time.time() + 900
        while True:
            try:
                latest = {"stats": stats_of(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)), "t": time.time()}
                break
            except grpc.RpcError:
                if time.time() > deadline:
                    raise
                time.sleep(2)

        def poll():
            while True:
                try:
                    mi = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=120)
                    latest.update(stats=stats_of(mi), t=time.time())
                except grpc.RpcError as e:
                    latest["error"] = e.code().name
                time.sleep(1.0)

        threading.Thread(target=poll, daemon=True).start()

        def pids():
            return {"engine": serve_actor_pids(cfg.app_name, ENGINE_DEPLOYMENT),
                    "ingress": serve_actor_pids(cfg.app_name, INGRESS_DEPLOYMENT), "proxy": serve_actor_pids()}

        out = open(a.stats, "a", buffering=1)
        out.write(json.dumps({"addr": addr, "t": time.time(), "pids": pids()}) + "\n")
        k, who = 0, pids()
        while True:
            if k % 10 == 0:  # Ray's actor table: a replaced replica shows up as a new id and pid
                who = pids()
            rss = {r: sum(rss_mib(p) for p in who[r].values()) for r in ROLES}
            now = time.time()
            out.write(json.dumps({"t": now, "rss_mib": rss["engine"], "rss_by_role": rss, "pids": who,
                                  "stats": latest["stats"], "stats_age_s": round(now - latest["t"], 1)}) + "\n")
            k += 1
            time.sleep(1.0)
    finally:
        ray.shutdown()
