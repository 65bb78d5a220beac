"""`memserve` command line: serve | generate | ingest | selfcheck | bench.

    memserve serve                              # local Ray + Serve + gRPC :9000 + HTTP :8000 + metrics :8080
    memserve generate "Tell me a joke" --chat   # stream from the server
    memserve generate "Once upon" --local       # in-process engine, no server
    memserve ingest book.txt --session book     # load a document into a session's KV memory
    memserve selfcheck --device cuda            # kernels vs references, bandwidth, decode tok/s
    memserve bench serving                      # bench/serving.py from the source checkout
    memserve shard-memory DIR --shards 3        # value tables -> per-shard files; then serve --model DIR --memory-shards 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:9000"


# ---- serve --------------------------------------------------------------------------------------

def _parse_kv(items: list[str]) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--engine-arg expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_serve(a: argparse.Namespace) -> int:
    import ray
    from memserve.deploy import metrics as M
    from memserve.deploy.app import init_ray, start
    from memserve.deploy.config import AppConfig

    engine_args = _parse_kv(a.engine_arg)
    for flag, key in (("num_blocks", "num_kv_blocks"), ("kv_cache_bytes", "kv_cache_bytes"), ("block_size", "block_size"),
                      ("max_num_seqs", "max_num_seqs"), ("max_model_len", "max_model_len"),
                      ("kv_memory_tier_bytes", "kv_memory_tier_bytes")):
        if getattr(a, flag) is not None:
            engine_args[key] = getattr(a, flag)
    autoscaling = None
    if a.max_replicas is not None:
        autoscaling = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                       "target_ongoing_requests": a.target_ongoing_requests}
    from memserve.deploy.auth import KEYS_ENV, ApiKeys

    keys_file = a.api_keys or os.environ.get(KEYS_ENV) or None
    try:
        keys = ApiKeys.from_file(keys_file)
    except ValueError as e:
        raise SystemExit(f"memserve serve: --api-keys: {e}") from None
    if not keys.enabled and not _is_loopback_host(a.host):
        raise SystemExit(f"memserve serve: --host {a.host} without API keys would expose an unauthenticated server; "
                         "pass --api-keys FILE (lines 'TENANT KEY') or keep the default --host 127.0.0.1")
    metrics_dir = M.make_multiproc_dir()
    try:
        cfg = AppConfig(model=a.model, engine_args=engine_args, num_replicas=a.replicas, autoscaling_config=autoscaling,
                        topology=a.topology, api_keys_file=str(Path(keys_file).resolve()) if keys_file else None,
                        limits=_parse_limits(a.limit),
                        max_waiting=a.max_waiting, metrics_dir=metrics_dir, engine_num_cpus=a.engine_cpus,
                        session_store=_session_store_url(a.session_store, engine_args),
                        memory_shards=a.memory_shards, shard_layout=a.shard_layout, shard_replicas=a.shard_replicas,
                        shard_num_cpus=a.shard_cpus)
        from memserve.deploy.memory_shard_app import shard_plan

        shard_plan(cfg)  # before Ray starts: shard files missing for P / layout -> the error names the flags
    except Exception as e:  # pydantic's message names the field
        M.cleanup_dir(metrics_dir)
        raise SystemExit(f"memserve serve: invalid settings: {e}") from None
    # Serve's gRPC proxy reads its receive limit from the environment at import (Ray's default 2 GiB)
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(cfg.limits.max_request_bytes))
    if keys.enabled:
        print(f"memserve: API keys of {len(keys.tenants())} tenant(s) from {keys_file}; clients send "
              "'authorization: Bearer KEY'", flush=True)
    else:
        print("memserve: WARNING: no API keys (--api-keys FILE / MEMSERVE_API_KEYS_FILE): anyone on this machine can "
              "use the server; it answers loopback clients only", flush=True)

    server, _ = M.start_exporter(metrics_dir, port=a.metrics_port, addr=a.host)
    stop = threading.Event()
    print(f"memserve: starting a local Ray cluster and Serve (model {a.model!r}, "
          f"{'autoscaling ' + json.dumps(autoscaling) if autoscaling else str(a.replicas) + ' replica(s)'}) ...", flush=True)
    t0 = time.time()
    try:
        init_ray(num_cpus=a.num_cpus, log_to_driver=a.verbose, logging_level="WARNING" if not a.verbose else "INFO")
        start(cfg, grpc_port=a.grpc_port, http_port=a.http_port, http_host=a.host)
        # after ray.init (which installs its own handlers): Ctrl-C / SIGTERM end the wait below
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"memserve: ready in {time.time() - t0:.0f} s\n"
              f"  gRPC     {a.host}:{a.grpc_port}   (memserve.v1.MemServe; try: memserve generate \"Hello\" --chat)\n"
              f"  HTTP     http://{a.host}:{a.http_port}/v1   (OpenAI-compatible: /v1/chat/completions, /v1/completions, "
              f"/v1/models)\n"
              f"  metrics  http://{a.host}:{a.metrics_port}/metrics\n"
              f"  Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("\nmemserve: shutting down ...", flush=True)
        return 0
    finally:
        # The local cluster is ours: ray.shutdown() stops Serve's controller, proxy and replicas with
        # it. serve.shutdown() first would wait for a graceful drain (measured: 30 s on Ctrl-C).
        for fn in (ray.shutdown, server.shutdown, server.server_close):
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        M.cleanup_dir(metrics_dir)


SESSION_STORE_ENV = "MEMSERVE_SESSION_STORE"


def default_session_store() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "memserve", "sessions")


def _session_store_url(flag: str | None, engine_args: dict) -> str | None:
    """--session-store, else $MEMSERVE_SESSION_STORE, else a local directory; 'none' (or an engine without
    the KV memory, which has no sessions) disables it."""
    url = flag or os.environ.get(SESSION_STORE_ENV) or default_session_store()
    if url.lower() == "none" or engine_args.get("kv_memory") == "off":
        return None
    return url


def _is_loopback_host(host: str) -> bool:
    from memserve.deploy.ingress import is_loopback

    return host == "localhost" or is_loopback(host)


def _parse_limits(items: list[str]):
    from memserve.deploy.limits import Limits

    d = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--limit expects NAME=VALUE (fields of deploy/limits.py Limits), got {it!r}")
        k, v = it.split("=", 1)
        d[k.strip()] = None if v.strip().lower() in ("none", "off") else v.strip()
    try:
        return Limits(**d)
    except Exception as e:  # noqa: BLE001 - pydantic names the field
        raise SystemExit(f"memserve serve: --limit: {e}") from None


def _metadata(a: argparse.Namespace) -> tuple:
    from memserve.deploy.auth import CLIENT_KEY_ENV

    key = getattr(a, "api_key", None) or os.environ.get(CLIENT_KEY_ENV)
    md = (("application", "memserve"),)
    return md + ((("authorization", f"Bearer {key}"),) if key else ())


# ---- generate -----------------------------------------------------------------------------------

def _sampling_fields(a: argparse.Namespace) -> dict:
    d = {}
    for k in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        v = getattr(a, k)
        if v is not None:
            d[k] = v
    if a.stop:
        d["stop"] = list(a.stop)
    return d


def _messages(a: argparse.Namespace, prompt: str) -> list[dict]:
    msgs = [{"role": "system", "content": a.system}] if a.system else []
    return msgs + [{"role": "user", "content": prompt}]


def _read_prompt(p: str) -> str:
    return sys.stdin.read() if p == "-" else p


def _channel(a: argparse.Namespace):
    """Plaintext, or TLS trusting the CA file --tls-ca (a server behind a TLS proxy: deploy/README.md "TLS")."""
    import grpc

    ca = getattr(a, "tls_ca", None)
    if not ca:
        return grpc.insecure_channel(a.address)
    return grpc.secure_channel(a.address, grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes()))


def cmd_generate(a: argparse.Namespace) -> int:
    prompt = _read_prompt(a.prompt)
    if a.local:
        return _generate_local(a, prompt)
    import grpc
    from memserve.deploy import memserve_pb2 as pb
    from memserve.deploy import memserve_pb2_grpc as pbg

    req = pb.GenerateRequest(session_id=a.session or "", sampling=pb.SamplingParams(**_sampling_fields(a)))
    if a.chat:
        req.messages.extend(pb.ChatMessage(**m) for m in _messages(a, prompt))
    else:
        req.prompt = prompt
    with _channel(a) as ch:
        stub = pbg.MemServeStub(ch)
        try:
            last = None
            for msg in stub.Generate(req, timeout=a.timeout, metadata=_metadata(a)):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                last = msg
            sys.stdout.write("\n")
            if last is not None and a.verbose:
                u = last.usage
                print(f"[finish={last.finish_reason} prompt={u.prompt_tokens} completion={u.completion_tokens} "
                      f"cached={u.cached_tokens}]", file=sys.stderr)
        except grpc.RpcError as e:
            print(f"\nmemserve generate: {e.code().name}: {e.details()}", file=sys.stderr)
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                print(f"(is a server running at {a.address}? start one with `memserve serve`, or use --local)",
                      file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0


def _generate_local(a: argparse.Namespace, prompt: str) -> int:
    from memserve.runtime import LLM, SamplingParams
    from memserve.runtime.errors import MemServeError

    if a.session:
        print("memserve generate: --session needs a server (sessions live in the server's KV memory)", file=sys.stderr)
        return 2
    try:
        llm = LLM(a.model)
        params = SamplingParams(**_sampling_fields(a))
        stream = llm.stream(_messages(a, prompt), params, chat=True) if a.chat else llm.stream(prompt, params)
        for out in stream:
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except MemServeError as e:
        print(f"memserve generate: {e}", file=sys.stderr)
        return 1
    return 0


# ---- ingest -------------------------------------------------------------------------------------

def cmd_ingest(a: argparse.Namespace) -> int:
    import grpc
    from memserve.deploy import memserve_pb2 as pb
    from memserve.deploy import memserve_pb2_grpc as pbg
    from tqdm import tqdm

    path = Path(a.file)
    if not path.is_file():
        print(f"memserve ingest: no such file: {path}", file=sys.stderr)
        return 2
    text = path.read_text(encoding="utf-8", errors="replace")
    with _channel(a) as ch, tqdm(unit="tok", desc=f"ingest {path.name} -> {a.session}") as bar:
        stub = pbg.MemServeStub(ch)
        try:
            last = None
            for p in stub.Ingest(pb.IngestRequest(session_id=a.session, text=text), timeout=a.timeout,
                                 metadata=_metadata(a)):
                if p.tokens_total and bar.total != p.tokens_total:
                    bar.total = p.tokens_total
                bar.n = p.tokens_done
                bar.refresh()
                last = p
        except grpc.RpcError as e:
            bar.close()
            print(f"memserve ingest: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if last is not None:
        print(f"session {a.session!r}: {last.tokens_done} tokens in KV memory")
    return 0


# ---- bench --------------------------------------------------------------------------------------

def bench_dir() -> Path:
    """bench/ of the source checkout (bench/ is not a package: it sits next to deploy/)."""
    return Path(__file__).resolve().parent.parent / "bench"


def cmd_selfcheck(a: argparse.Namespace) -> int:
    from memserve.runtime.selfcheck import run
    streams = [1, 4] if a.quick else [int(x) for x in a.streams.split(",")]
    return run(device=a.device, model=a.model, streams=streams, max_tokens=8 if a.quick else a.max_tokens,
               threads=a.threads, bench=not a.no_bench, engine=not a.no_engine)


def cmd_bench(a: argparse.Namespace) -> int:
    d = bench_dir()
    script = d / f"{a.name}.py"
    if not script.is_file():
        avail = sorted(p.stem for p in d.glob("*.py") if not p.stem.startswith("_")) if d.is_dir() else []
        where = f"{d}" if d.is_dir() else f"{d} (missing: memserve is not installed from a source checkout)"
        print(f"memserve bench: no benchmark {a.name!r} in {where}. "
              f"{'Available: ' + ', '.join(avail) if avail else 'Clone the repository and `pip install -e .` to run benchmarks.'}",
              file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.call([sys.executable, str(script), *a.args], cwd=str(d.parent), env=env)


def cmd_shard_memory(a: argparse.Namespace) -> int:
    from memserve.deploy.memory_shards import find_value_tables, shard_memory
    from tqdm import tqdm

    if not Path(a.model).is_dir():
        print(f"memserve shard-memory: {a.model} is not a model directory", file=sys.stderr)
        return 2
    try:
        tables = find_value_tables(a.model)
        total = sum(math.prod(t["shape"]) * _itemsize(t["dtype"]) for t in tables.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"shard-memory {a.layout} x{a.shards}") as bar:
            out = shard_memory(a.model, a.shards, a.layout, progress=bar.update)
    except ValueError as e:  # no memory layers, P > rows/columns, bad layout: the message says which
        print(f"memserve shard-memory: {e}", file=sys.stderr)
        return 2
    print(f"memserve shard-memory: wrote {out} ({len(tables)} table(s) x {a.shards} shard(s)); serve it with "
          f"`memserve serve --model {a.model} --memory-shards {a.shards} --shard-layout {a.layout}`")
    return 0


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "I8": 1}.get(dtype, 4)


def cmd_convert_memory(a: argparse.Namespace) -> int:
    from memserve.runtime.memory_layers_convert import convert_lucidrains

    if a.source == "lingua":
        from memserve.runtime.memory_layers_convert_lingua import convert_lingua

        if not a.checkpoint or a.pkm:
            print("memserve convert-memory --from lingua: needs --checkpoint DIR (params.json + consolidated.pth) "
                  "and no --pkm", file=sys.stderr)
            return 2
        print(f"memserve convert-memory: wrote {convert_lingua(a.checkpoint, a.out, tokenizer=a.tokenizer)}")
        return 0
    if not a.pkm:
        print("memserve convert-memory --from lucidrains: needs --pkm LAYER=PATH[#PREFIX]", file=sys.stderr)
        return 2
    pkms = {}
    for spec in a.pkm:  # LAYER=PATH[#PREFIX]
        layer, _, rest = spec.partition("=")
        path, _, prefix = rest.partition("#")
        if not layer.isdigit() or not path:
            print(f"memserve convert-memory: --pkm {spec!r}: expected LAYER=PATH[#PREFIX], e.g. 4=pkm.pt#layers.4.ff.",
                  file=sys.stderr)
            return 2
        pkms[int(layer)] = (path, prefix)
    out = convert_lucidrains(a.base, pkms, a.out, mode=a.mode, knn=a.knn, bn_eps=a.bn_eps)
    print(f"memserve convert-memory: wrote {out}")
    return 0


def cmd_init_memory(a: argparse.Namespace) -> int:
    from memserve.runtime.memory_layers_init import init_memory

    out = init_memory(a.base, a.out, [int(x) for x in a.layers.split(",")], n_keys=a.n_keys, heads=a.heads,
                      knn=a.knn, k_dim=a.k_dim, shared_values=a.shared, swilu=a.swilu, seed=a.seed,
                      values_dtype=a.values_dtype)
    print(f"memserve init-memory: wrote {out}")
    return 0


# ---- parser -------------------------------------------------------------------------------------

def cmd_memorize(a: argparse.Namespace) -> int:
    import json

    from memserve.runtime.memory_layers_memorize import memorize

    with open(a.facts, encoding="utf-8") as f:
        facts = [json.loads(line) for line in f if line.strip()]
    bg = open(a.background, encoding="utf-8").read().split("\n\n") if a.background else None
    r = memorize(a.model, facts, a.out, epochs=a.epochs, top_t=a.top_t, lr=a.lr, batch_size=a.batch_size,
                 background=bg, seed=a.seed, gate=not a.no_gate, memory_at=a.memory_at)
    print(f"memserve memorize: {len(facts)} facts, {r.steps} steps in {r.seconds:.0f}s, {r.rows_written} rows "
          f"written, loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}; wrote {r.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memserve", description="Serve memory-augmented long-context LLMs.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="start a local Ray cluster + Serve + gRPC + metrics")
    s.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), an HF dir or a .gguf")
    s.add_argument("--replicas", type=int, default=1, help="engine replicas (fixed; see --max-replicas to autoscale)")
    s.add_argument("--min-replicas", type=int, default=1)
    s.add_argument("--max-replicas", type=int, default=None, help="enable autoscaling up to this many replicas")
    s.add_argument("--target-ongoing-requests", type=float, default=8)
    s.add_argument("--topology", choices=["ingress", "direct"], default="ingress",
                   help="'ingress': ingress deployment in front of engine replicas; 'direct': engine replicas serve "
                        "gRPC themselves (one Ray hop less per token; see deploy/README.md)")
    s.add_argument("--host", default="127.0.0.1", help="address bound by the HTTP API and the metrics server, printed for clients")
    s.add_argument("--grpc-port", type=int, default=9000)
    s.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy: the OpenAI-compatible API (base_url http://HOST:PORT/v1)")
    s.add_argument("--metrics-port", type=int, default=8080)
    s.add_argument("--max-waiting", type=int, default=64, help="per-replica waiting-queue bound (RESOURCE_EXHAUSTED beyond)")
    s.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks per replica (engine num_kv_blocks)")
    s.add_argument("--kv-cache-bytes", type=int, default=None, help="KV-cache byte budget per replica (when --num-blocks is unset)")
    s.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + output tokens")
    s.add_argument("--block-size", type=int, default=None, help="tokens per KV block")
    s.add_argument("--max-num-seqs", type=int, default=None, help="max sequences in a running batch")
    s.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other engine argument (e.g. KV-memory settings); VALUE is parsed as JSON when it can be")
    s.add_argument("--api-keys", default=None, metavar="FILE",
                   help="API keys, one 'TENANT KEY' per line (env MEMSERVE_API_KEYS_FILE); without keys the server "
                        "answers loopback clients only")
    s.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="a request/tenant bound of deploy/limits.py, e.g. max_tokens=4096, max_streams_per_tenant=16")
    s.add_argument("--session-store", default=None, metavar="URL",
                   help="durable session snapshots (fsspec URL: directory, s3://..., gs://...; env MEMSERVE_SESSION_STORE; "
                        "default ~/.local/share/memserve/sessions; 'none': sessions in replica RAM only)")
    s.add_argument("--kv-memory-tier-bytes", type=int, default=None, metavar="N",
                   help="per-replica byte budget of the KV memory's compressed tier (all sequences and sessions); at "
                        "the limit idle sessions are parked in the session store (snapshot kept), then blocks are evicted")
    s.add_argument("--memory-shards", type=int, default=0, metavar="P",
                   help="serve each memory-layer value table from P MemoryShard deployments shared by all engine "
                        "replicas (write them first: memserve shard-memory DIR --shards P --layout L); 0: in-engine")
    s.add_argument("--shard-layout", choices=["columns", "rows"], default="columns",
                   help="how the tables were cut: 'columns' (bit-exact, balanced) or 'rows' (partial sums)")
    s.add_argument("--shard-replicas", default="1", metavar="MIN:MAX",
                   help="replicas per shard deployment: N, or MIN:MAX to autoscale on in-flight lookups")
    s.add_argument("--shard-cpus", type=float, default=0.0, help="Ray CPUs reserved per shard replica")
    s.add_argument("--engine-cpus", type=float, default=0.1, help="Ray CPUs reserved per engine replica")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    s.add_argument("-v", "--verbose", action="store_true", help="show Ray/Serve logs")
    s.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="stream a generation (from a server, or --local in-process)")
    g.add_argument("prompt", help="prompt text ('-' reads stdin)")
    g.add_argument("--address", default=DEFAULT_ADDRESS)
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (chat template)")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--session", default=None, help="continue in a session's KV memory")
    g.add_argument("--local", action="store_true", help="run the engine in this process (no server)")
    g.add_argument("--model", default="default", help="model for --local")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--timeout", type=float, default=600, help="gRPC deadline in seconds")
    g.add_argument("--api-key", default=None, help="API key (default: env MEMSERVE_API_KEY)")
    g.add_argument("--tls-ca", default=None, help="TLS: trust this CA certificate (PEM) instead of plaintext gRPC")
    g.add_argument("-v", "--verbose", action="store_true", help="print finish reason and token usage to stderr")
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("ingest", help="ingest a text file into a session's KV memory")
    i.add_argument("file")
    i.add_argument("--session", required=True)
    i.add_argument("--address", default=DEFAULT_ADDRESS)
    i.add_argument("--timeout", type=float, default=3600)
    i.add_argument("--api-key", default=None, help="API key (default: env MEMSERVE_API_KEY)")
    i.add_argument("--tls-ca", default=None, help="TLS: trust this CA certificate (PEM) instead of plaintext gRPC")
    i.set_defaults(fn=cmd_ingest)

    c = sub.add_parser("selfcheck", help="check every kernel against its reference on a device, then bandwidth and decode tok/s")
    c.add_argument("--device", default="cpu", help="cpu or cuda (Triton kernels)")
    c.add_argument("--model", default="default", help="model for the engine decode figures (a tiny one for CI)")
    c.add_argument("--streams", default="1,16,64", help="comma-separated stream counts for engine decode")
    c.add_argument("--max-tokens", type=int, default=32, help="decode tokens per stream")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads for the engine")
    c.add_argument("--quick", action="store_true", help="1 and 4 streams, 8 tokens each")
    c.add_argument("--no-bench", action="store_true", help="skip the bandwidth benchmark")
    c.add_argument("--no-engine", action="store_true", help="skip the engine decode figures")
    c.set_defaults(fn=cmd_selfcheck)

    sm = sub.add_parser("shard-memory", help="cut a memory-layer model's value tables into per-shard files "
                        "(for serve --memory-shards)")
    sm.add_argument("model", help="memory-layer model directory; files go to DIR/memory_shards/<layout>-<P>/")
    sm.add_argument("--shards", type=int, required=True, metavar="P", help="shards per value table")
    sm.add_argument("--layout", choices=["columns", "rows"], default="columns",
                    help="'columns': each shard holds columns [c0, c1) of every row; 'rows': rows [r0, r1)")
    sm.set_defaults(fn=cmd_shard_memory)

    m = sub.add_parser("init-memory", help="write a 'parallel' memory-layer model from a dense base (output = base's)")
    m.add_argument("--base", default="default", help="dense base: 'default', an HF dir or a .gguf (GGUF is dequantized)")
    m.add_argument("--layers", required=True, help="comma-separated decoder layers, e.g. 8,16,24")
    m.add_argument("--n-keys", type=int, default=256, help="sub-keys per half (n_keys**2 slots)")
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--knn", type=int, default=32)
    m.add_argument("--k-dim", type=int, default=256)
    m.add_argument("--shared", action=argparse.BooleanOptionalAction, default=True, help="one shared value table")
    m.add_argument("--swilu", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--values-dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                   help="value table storage; int8 = int8 rows + per-row fp32 scales (…values.scales)")
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_init_memory)

    cv = sub.add_parser("convert-memory", help="a memory model from lucidrains' product-key-memory PKM state dicts "
                        "on a dense base, or from a Meta lingua memory checkpoint (facebookresearch/memory)")
    cv.add_argument("--from", dest="source", choices=["lucidrains", "lingua"], default="lucidrains")
    cv.add_argument("--checkpoint", help="lingua: the consolidated directory (params.json + consolidated.pth)")
    cv.add_argument("--tokenizer", help="lingua: an HF tokenizer directory to copy (lingua's is not in the checkpoint)")
    cv.add_argument("--base", default="default", help="dense base: 'default', an HF dir or a .gguf")
    cv.add_argument("--pkm", action="append",
                    help="LAYER=PATH[#PREFIX]: a torch.save'd state dict (loaded weights_only) whose PKM tensors start "
                         "with PREFIX, for decoder layer LAYER; repeat per layer")
    cv.add_argument("--mode", choices=["replace", "parallel"], default="replace")
    cv.add_argument("--knn", type=int, default=32, help="the PKM's topk (not stored in its state dict)")
    cv.add_argument("--bn-eps", type=float, default=1e-5, help="the query BatchNorm1d's eps")
    cv.add_argument("--out", required=True)
    cv.set_defaults(fn=cmd_convert_memory)

    z = sub.add_parser("memorize", help="teach a memory-layer model facts (sparse value-row updates, frozen base)")
    z.add_argument("model", help="memory-layer model directory (from init-memory)")
    z.add_argument("--facts", required=True, help='JSONL: {"answer", "train": [statements], "subject"?} per line')
    z.add_argument("--out", required=True)
    z.add_argument("--epochs", type=int, default=5)
    z.add_argument("--top-t", type=int, default=1000, help="value rows updated per batch (most fact-specific)")
    z.add_argument("--lr", type=float, default=0.1, help="lazy-Adam lr on value rows (value_proj is scaled to the residual, see memorize)")
    z.add_argument("--batch-size", type=int, default=16)
    z.add_argument("--background", help="general text file for slot idf (default: stdlib docstrings)")
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--no-gate", action="store_true",
                   help="do not train the per-token memory gate (it keeps the memory silent on general text)")
    z.add_argument("--memory-at", choices=["answer", "all"], default="all",
                   help="positions where the trained memory speaks during training (see memorize)")
    z.set_defaults(fn=cmd_memorize)

    b = sub.add_parser("bench", help="run bench/NAME.py from the source checkout")
    b.add_argument("name", help="e.g. serving")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    b.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.fn(a) or 0


if __name__ == "__main__":
    sys.exit(main())
