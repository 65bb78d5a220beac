"""Replica faults on a real local Ray Serve app (issue 20 item 2): two engine replicas of a tiny
random-weight Llama with the KV memory on and ONE session store (a tmp dir) shared by both, a real
gRPC client through Serve's proxy, loopback only.

* SIGKILL of one engine replica's process mid-stream: its in-flight stream ends with UNAVAILABLE
  within 10 s, the other replica's stream completes with the tokens a run without the kill gives,
  and once Serve has replaced the replica each of the killed replica's sessions answers its next
  request with the same greedy tokens as that run (it continues from the store, from the snapshot
  written after its last finished request; the killed request never finished, so it is not part of
  the session's history).
* Downscale 2 -> 1 (a config redeploy that changes only the engine deployment's num_replicas, the
  `serve deploy` / KubeRay path) with a stream in flight on each replica: the kept replica's stream
  completes; the removed replica's completes too if it fits in graceful_shutdown_timeout_s, else it is
  cut with UNAVAILABLE and the drain keeps what it computed (on the loaded 2-core box: cut in the first
  run, completed in the second).
  0 sessions are lost, and every session answers as a run without the downscale (the reference replays
  the cut request with max_tokens = the tokens the session kept: greedy, so the same prefix).

The reference ("a run without the fault") is the offline LLMEngine without a store replaying each
session's finished requests one after another. Every request here runs alone on its replica (or one
per replica), so batching cannot change the numerics.

The app is deployed from a config (client.deploy_apps, as `serve deploy` does), not `serve.run`:
serve.run gives every deployment a fresh random version, so a redeploy with another replica count
would restart every replica instead of removing one.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy import memserve_pb2_grpc as pbg
from serving_testlib import free_port, local_ray, wait_for

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # each test waits on Serve starting / replacing / removing replicas (30-90 s)

APP = "faults"
KV_CFG = {"n_init": 4, "n_local": 32, "block_size": 8, "repr_topk": 2, "chunk_size": 24, "key_group": 8,
          "value_group": 8, "topk": 10_000, "compression": "none"}
ENGINE_ARGS = {"max_num_seqs": 4, "num_kv_blocks": 128, "block_size": 16, "progress": False,
               "kv_memory": "auto", "kv_memory_config": KV_CFG}
Q1, Q2 = 6, 5  # greedy tokens of the first / next turn on a session


def _ids(n, seed):
    import torch

    return torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from memserve.deploy.config import AppConfig
    from ray import serve
    from tiny_models import make_tiny_model

    model = str(make_tiny_model(tmp_path_factory.mktemp("faults_tiny"), arch="llama"))
    store = str(tmp_path_factory.mktemp("faults_store"))
    cfg = AppConfig(app_name=APP, model=model, num_replicas=2, max_waiting=8, session_store=store,
                    engine_args=ENGINE_ARGS, unavailable_timeout_s=60, router_seed=0, graceful_shutdown_timeout_s=10)
    grpc_port = free_port()
    with local_ray():
        from memserve.deploy.app import grpc_options
        from ray.serve.config import HTTPOptions

        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=free_port()), grpc_options=grpc_options(grpc_port))
        deploy = _deployer(cfg)
        deploy(2)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = pbg.MemServeStub(channel)
        wait_for(lambda: len(_engine_replicas()) == 2 and _try(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                                                          timeout=30)),
                 180, "two engine replicas")
        yield {"stub": stub, "model": model, "store": store, "deploy": deploy}
        channel.close()


def _deployer(cfg):
    from memserve.deploy.app import ENGINE_DEPLOYMENT
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    def deploy(num_replicas: int):
        _get_global_client().deploy_apps(ServeDeploySchema.parse_obj({"applications": [{
            "name": APP, "route_prefix": "/", "import_path": "memserve.deploy.app:app_builder",
            "args": cfg.model_dump(), "deployments": [{"name": ENGINE_DEPLOYMENT, "num_replicas": num_replicas}]}]}))

    return deploy


def _try(fn):
    try:
        return fn()
    except grpc.RpcError:
        return None


def _engine_replicas() -> dict[str, int]:
    """unique replica id -> pid of every live engine replica actor."""
    from memserve.deploy.app import serve_actor_pids

    return serve_actor_pids(APP, "MemServeEngine")


def _greedy(n):
    return pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _generate(stub, sid, prompt, n, timeout=120):
    msgs = list(stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, session_id=sid, sampling=_greedy(n)),
                              timeout=timeout))
    assert msgs[-1].finish_reason == "length", msgs[-1]
    return [t for m in msgs for t in m.token_ids]


def _open_sessions(stub, prefix, n, seed):
    """n sessions (ingest + one turn each); returns {sid: history} and the replica holding each."""
    hist, holder = {}, {}
    for k in range(n):
        sid = f"{prefix}{k}"
        doc, q1 = _ids(40 + 8 * k, seed + k), _ids(5, seed + 100 + k)
        prog = list(stub.Ingest(pb.IngestRequest(session_id=sid, token_ids=doc), timeout=120))
        assert prog[-1].done
        _generate(stub, sid, q1, Q1)
        hist[sid] = [("ingest", doc), ("gen", q1, Q1)]
        holder[sid] = stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=60).replica
    return hist, holder


def _reference(model, history) -> list[int]:
    """The offline engine (no store, no fault) replaying a session's requests; the last one's tokens."""
    from memserve.runtime.engine import LLMEngine
    from memserve.runtime.sampling import SamplingParams

    eng = LLMEngine(model, **ENGINE_ARGS)
    out = None
    for i, step in enumerate(history):
        if step[0] == "ingest":
            for _ in eng.ingest("s", step[1]):
                pass
            continue
        eng.add_request(f"r{i}", step[1], SamplingParams(max_tokens=step[2], temperature=0.0, ignore_eos=True),
                        session_id="s")
        while eng.has_unfinished():
            for o in eng.step():
                out = o
    return list(out.token_ids)


class _Stream(threading.Thread):
    """A Generate stream read in a thread: tokens so far, the end (finish reason or status code), when."""

    def __init__(self, stub, sid, prompt, n):
        super().__init__(daemon=True)
        self.req = pb.GenerateRequest(prompt_token_ids=prompt, session_id=sid, sampling=_greedy(n))
        self.stub, self.tokens, self.finish, self.code, self.details, self.ended = stub, [], None, None, "", None
        self.start()

    def run(self):
        try:
            for m in self.stub.Generate(self.req, timeout=120):
                self.tokens.extend(m.token_ids)
                self.finish = m.finish_reason or None
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details()
        self.ended = time.monotonic()


def test_replica_sigkill_mid_stream(served):
    stub = served["stub"]
    hist, holder = _open_sessions(stub, "k", 6, seed=1)
    assert len(set(holder.values())) == 2, holder  # p2c spread 6 new sessions (all on one: p = 2^-5)
    replicas = _engine_replicas()
    assert set(holder.values()) == set(replicas), (holder, replicas)
    victim = holder["k0"]
    doomed = [s for s in hist if holder[s] == victim]
    others = [s for s in hist if holder[s] != victim]
    # one long stream on each replica (session affinity routes each to its session's holder)
    v_prompt, o_prompt, o_n = _ids(4, 50), _ids(4, 51), 400
    o_stream = _Stream(stub, others[0], o_prompt, o_n)
    v_stream = _Stream(stub, doomed[0], v_prompt, 6000)
    wait_for(lambda: len(v_stream.tokens) >= 3 and len(o_stream.tokens) >= 3, 60, "both streams under way")
    os.kill(replicas[victim], signal.SIGKILL)
    killed_at = time.monotonic()
    o_running_at_kill = o_stream.finish is None
    v_stream.join(30)
    o_stream.join(120)

    assert v_stream.ended is not None, "the killed replica's stream hangs"
    assert v_stream.code == grpc.StatusCode.UNAVAILABLE, (v_stream.code, v_stream.details, v_stream.finish)
    assert v_stream.ended - killed_at < 10, v_stream.ended - killed_at
    print(f"kill -> UNAVAILABLE {v_stream.ended - killed_at:.3f} s ({len(v_stream.tokens)} tokens before); "
          f"other stream {len(o_stream.tokens)} tokens, {len(o_stream.tokens) if o_running_at_kill else 0} expected")
    assert o_running_at_kill, "the other stream had finished before the kill: the test would mean nothing"
    assert o_stream.code is None and o_stream.finish == "length", (o_stream.code, o_stream.details)
    hist[others[0]].append(("gen", o_prompt, o_n))
    assert o_stream.tokens == _reference(served["model"], hist[others[0]])

    # Serve replaces the killed replica; then every session answers as in a run without the kill
    wait_for(lambda: len(r := _engine_replicas()) == 2 and victim not in r, 180, "Serve to replace the replica")
    print(f"replacement replica alive {time.monotonic() - killed_at:.1f} s after the kill")
    for sid in hist:
        q2 = _ids(3, 200 + int(sid[1:]))
        got = _generate(stub, sid, q2, Q2)
        hist[sid].append(("gen", q2, Q2))
        assert got == _reference(served["model"], hist[sid]), sid
    for sid in hist:
        assert stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=60).deleted


def test_downscale_two_to_one_loses_no_session(served):
    stub, deploy = served["stub"], served["deploy"]
    wait_for(lambda: len(_engine_replicas()) == 2, 180, "two engine replicas")
    hist, holder = _open_sessions(stub, "d", 6, seed=300)
    before = set(_engine_replicas())
    assert len(set(holder.values())) == 2, holder
    sizes = {s: stub.GetSession(pb.GetSessionRequest(session_id=s), timeout=60).num_tokens for s in hist}
    # a stream in flight on each replica while the replica count goes down
    first = {r: next(s for s in hist if holder[s] == r) for r in before}
    streams = {s: _Stream(stub, s, _ids(4, 400 + i), 300) for i, s in enumerate(first.values())}
    wait_for(lambda: all(len(st.tokens) >= 2 for st in streams.values()), 60, "streams under way")
    deploy(1)
    t0 = time.monotonic()
    wait_for(lambda: len(r := _engine_replicas()) == 1 and set(r) < before, 180, "the downscale to one replica")
    print(f"downscale 2 -> 1 done in {time.monotonic() - t0:.1f} s")
    (kept,) = _engine_replicas()
    removed = (before - {kept}).pop()
    assert [s for s in hist if holder[s] == removed], "the removed replica held no session"
    for st in streams.values():
        st.join(60)
    # 0 lost: every session is there with all it had, and continues exactly
    listed = {s: stub.GetSession(pb.GetSessionRequest(session_id=s), timeout=60) for s in hist}
    for i, (sid, st) in enumerate(streams.items()):
        if holder[sid] == kept or st.code is None:
            assert st.code is None and st.finish == "length" and len(st.tokens) == 300, (sid, st.code, st.details)
            k = 300
        else:  # outlived graceful_shutdown_timeout_s: cut with UNAVAILABLE; the drain kept what it computed
            assert st.code == grpc.StatusCode.UNAVAILABLE, (sid, st.code, st.details)
            k = listed[sid].num_tokens - sizes[sid] - 4
            assert len(st.tokens) <= k < 300, (k, len(st.tokens))
        print(f"stream on the {'kept' if holder[sid] == kept else 'removed'} replica: {st.code or st.finish}, "
              f"session kept {k} of its tokens")
        hist[sid].append(("gen", _ids(4, 400 + i), k))
        sizes[sid] += 4 + k
    assert {s: i.num_tokens for s, i in listed.items()} == sizes
    assert {i.replica for i in listed.values()} == {kept}
    for k, sid in enumerate(hist):
        q2 = _ids(3, 500 + k)
        got = _generate(stub, sid, q2, Q2)
        hist[sid].append(("gen", q2, Q2))
        assert got == _reference(served["model"], hist[sid]), sid
    deploy(2)  # back to two for whatever runs next
