"""TLS termination in front of memserve's gRPC (issue 20 item 5): Serve's gRPC proxy has no TLS option
(ray issue #34103), so a real nginx (Debian's package) terminates TLS and `grpc_pass`es to the
plaintext port — the setup deploy/README.md ("TLS") documents.

Here: a self-signed CA and a server certificate made with openssl, nginx as this user with its own
prefix / pid / temp dirs, a plaintext memserve gRPC server without Ray (grpc_local.py: a grpc.aio
server answering with MemServeIngress's methods, as Serve's proxy does) over a tiny random-weight
model, and real grpc clients:
through TLS the tokens equal the direct ones; status codes, details and metadata (API keys) cross
nginx; a client cancel through nginx frees the request's KV blocks; plaintext to the TLS port and a
client trusting another CA both fail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_local import make_ingress, start_server
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy import memserve_pb2_grpc as pb_grpc
from memserve.deploy.auth import ApiKeys, parse_keys
from memserve.deploy.worker import EngineWorker
from serving_testlib import LocalClient, free_port, wait_for
from tls_testlib import MISSING, make_ca, make_server_cert, nginx_tls, run_nginx

pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

KEY = "t" * 20 + "-tls-tenant-key"
CALL_S = 20  # bound on every RPC in this file


class ServerThread:
    """The Ray-free memserve gRPC server on its own event loop in a thread (the clients are sync)."""

    def __init__(self, ingress):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.addr = self.run(start_server(ingress))

    def run(self, coro, timeout=CALL_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.run(self.server.stop(1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    from memserve.runtime.async_engine import AsyncLLMEngine

    d = tmp_path_factory.mktemp("tls")
    ca_crt, _ = make_ca(d, "ca")
    other_ca, _ = make_ca(d, "other-ca")
    cert, key = make_server_cert(d, "ca")
    engine = AsyncLLMEngine(str(tiny_llama_dir), progress=False, num_kv_blocks=128, block_size=4, max_waiting=8)
    worker = EngineWorker(engine, model_name="tiny", replica="r0")
    ingress = make_ingress(LocalClient(worker), unavailable_timeout_s=5.0, keys=ApiKeys(parse_keys(f"tls {KEY}\n")))
    srv = ServerThread(ingress)
    try:
        with nginx_tls(d, cert, key, int(srv.addr.rsplit(":", 1)[1])) as tls_port:
            yield {"engine": engine, "ingress": ingress, "server": srv, "direct": srv.addr, "tls": f"localhost:{tls_port}", "cert": cert, "key": key,
                   "ca": ca_crt.read_bytes(), "other_ca": other_ca.read_bytes(), "dir": d}
    finally:
        srv.stop()
        engine.shutdown()


def stub(channel):
    return pb_grpc.MemServeStub(channel)


def tls_channel(s, ca_key="ca"):
    return grpc.secure_channel(s["tls"], grpc.ssl_channel_credentials(root_certificates=s[ca_key]))


AUTH = (("authorization", f"Bearer {KEY}"),)


def generate(channel, req, metadata=AUTH):
    msgs = list(stub(channel).Generate(req, metadata=metadata, timeout=CALL_S))
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs), msgs[-1]


def test_tls_stream_gives_the_direct_tokens(stack):
    req = pb.GenerateRequest(prompt="The river carried the lantern past the quiet meadow",
                             sampling=pb.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(stack["direct"]) as ch:
        direct = generate(ch, req)
    with tls_channel(stack) as ch:
        via_tls = generate(ch, req)
        info = stub(ch).GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=CALL_S)
    assert len(direct[0]) == 24 and direct[2].finish_reason == "length"
    assert via_tls[0] == direct[0] and via_tls[1] == direct[1]
    assert (via_tls[2].usage.prompt_tokens, via_tls[2].usage.completion_tokens) == \
        (direct[2].usage.prompt_tokens, direct[2].usage.completion_tokens)
    assert info.vocab_size == 49152


def test_status_codes_details_and_metadata_cross_nginx(stack):
    with tls_channel(stack) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            generate(ch, pb.GenerateRequest(prompt="x"), metadata=(("authorization", "Bearer wrong-key-wrong-key-x"),))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ei.value.details().startswith("authorization:")
        with pytest.raises(grpc.RpcError) as ei:
            generate(ch, pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=1.5)))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "top_p: must be in (0, 1]" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            stub(ch).GetSession(pb.GetSessionRequest(session_id="nope"), metadata=AUTH, timeout=CALL_S)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_session_ingest_then_generate_through_tls(stack):
    doc = "Copper harbor signal: the password is violet glacier. " * 4
    with tls_channel(stack) as ch:
        prog = list(stub(ch).Ingest(pb.IngestRequest(session_id="tls-doc", text=doc), metadata=AUTH, timeout=CALL_S))
        assert prog[-1].done and prog[-1].tokens_done == prog[-1].tokens_total > 0
        info = stub(ch).GetSession(pb.GetSessionRequest(session_id="tls-doc"), metadata=AUTH, timeout=CALL_S)
        assert info.num_tokens == prog[-1].tokens_total
        req = pb.GenerateRequest(prompt=" The password is", session_id="tls-doc",
                                 sampling=pb.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        ids, _, last = generate(ch, req)
        assert len(ids) == 6 and last.finish_reason == "length"
        stub(ch).DeleteSession(pb.DeleteSessionRequest(session_id="tls-doc"), metadata=AUTH, timeout=CALL_S)


def test_cancel_through_nginx_frees_kv_blocks(stack):
    engine = stack["engine"]
    free0 = engine.stats().num_free_blocks
    req = pb.GenerateRequest(prompt="Story of the copper engine and the summer paper",
                             sampling=pb.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    with tls_channel(stack) as ch:
        call = stub(ch).Generate(req, metadata=AUTH, timeout=CALL_S)
        got = 0
        for m in call:
            got += len(m.token_ids)
            if got >= 3:
                break
        assert engine.stats().num_free_blocks < free0  # the request holds blocks while it streams
        call.cancel()
    # nginx resets the upstream stream; the server's handler is cancelled and aborts the request
    wait_for(lambda: engine.stats().num_free_blocks == free0, 15, "KV blocks back to baseline after cancel")
    assert engine.stats().num_running == 0


def test_plaintext_client_to_tls_port_fails(stack):
    with grpc.insecure_channel(stack["tls"].replace("localhost", "127.0.0.1")) as ch:
        t0 = time.time()
        with pytest.raises(grpc.RpcError) as ei:
            stub(ch).GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=5)
    # nginx answers cleartext HTTP/2 on its TLS port with an HTTP/1.x 400; grpc reports the port unusable
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
    assert "HTTP/2" in ei.value.details() or "http1" in ei.value.details().lower(), ei.value.details()
    assert time.time() - t0 < 10


def test_client_trusting_another_ca_fails(stack):
    with tls_channel(stack, "other_ca") as ch:
        with pytest.raises(grpc.RpcError) as ei:
            stub(ch).GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
    assert "CERTIFICATE_VERIFY_FAILED" in ei.value.details(), ei.value.details()


@contextlib.contextmanager
def openai_http(stack):
    """The OpenAI API handlers (deploy/openai_api.py) over the stack's ingress core, served by
    uvicorn on the server thread's loop (Serve's HTTP proxy is uvicorn too); yields the port."""
    import uvicorn
    from memserve.deploy.openai_api import OpenAIServer
    from starlette.requests import Request

    api = OpenAIServer(stack["ingress"].core, aliases=["tiny"])

    async def asgi(scope, receive, send):
        response = await api(Request(scope, receive))
        await response(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    running = asyncio.run_coroutine_threadsafe(server.serve(), stack["server"].loop)
    try:
        wait_for(lambda: server.started, 20, "uvicorn to start")
        yield port
    finally:
        server.should_exit = True
        running.result(CALL_S)


def sse_text(url: str, body: dict, context=None, key: str | None = KEY) -> str:
    """The streamed chat completion's text (the deltas joined); HTTPError for a non-200 status."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    out = []
    with urllib.request.urlopen(req, timeout=CALL_S, context=context) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    return "".join(out)


def test_the_helm_charts_nginx_config_terminates_tls(stack):
    """The nginx.conf of the chart's tls-proxy sidecar (helm/memserve, tls.enabled), rendered by the
    real helm binary, run by the real nginx (only its file paths are moved into the test's dir): gRPC
    on tls.port, and the OpenAI HTTP API on tls.httpPort with its event stream and its 401."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helm"))
    from chart_testlib import by_kind, render

    port, https_port, upstream = free_port(), free_port(), stack["direct"].rsplit(":", 1)[1]
    with openai_http(stack) as http_port:
        objs, _ = render("tls.yaml", sets=(f"tls.port={port}", f"grpc.port={upstream}", f"tls.httpPort={https_port}",
                                           f"http.port={http_port}"))
        (cm,) = [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-tls-nginx")]
        d = stack["dir"] / "chart"
        d.mkdir(exist_ok=True)
        chart_conf = cm["data"]["nginx.conf"]
        assert chart_conf.count("/tmp/") == 6 and chart_conf.count("/etc/memserve/tls/") == 4
        conf = (chart_conf.replace("/tmp/", f"{d}/").replace("/etc/memserve/tls/tls.crt", str(stack["cert"]))
                .replace("/etc/memserve/tls/tls.key", str(stack["key"])))
        if os.geteuid() == 0:  # the pod runs it as uid 1000; as root nginx would drop its workers to nobody
            conf = "user root;\n" + conf
        req = pb.GenerateRequest(prompt="Summer paper glacier", sampling=pb.SamplingParams(
            max_tokens=8, temperature=0.0, ignore_eos=True))
        with grpc.insecure_channel(stack["direct"]) as ch:
            direct = generate(ch, req)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Summer paper glacier"}], "max_tokens": 8,
                "temperature": 0.0, "stream": True}
        http_direct = sse_text(f"http://127.0.0.1:{http_port}/v1/chat/completions", chat)
        assert http_direct
        with run_nginx(d, conf, port):
            with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=stack["ca"])) as ch:
                assert generate(ch, req)[:2] == direct[:2]
            tls = ssl.create_default_context(cadata=stack["ca"].decode())
            url = f"https://localhost:{https_port}/v1/chat/completions"
            assert sse_text(url, chat, tls) == http_direct
            with pytest.raises(urllib.error.HTTPError) as ei:  # the key travels inside TLS and is checked
                sse_text(url, chat, tls, key=None)
            assert ei.value.code == 401
            with pytest.raises(urllib.error.URLError):  # plaintext HTTP to the HTTPS port is refused
                urllib.request.urlopen(f"http://localhost:{https_port}/v1/models", timeout=CALL_S)


def test_memserve_generate_cli_over_tls(stack, capsys, tmp_path):
    from memserve.deploy import cli

    ca = tmp_path / "ca.crt"
    ca.write_bytes(stack["ca"])
    req = pb.GenerateRequest(prompt="Quiet copper meadow", sampling=pb.SamplingParams(max_tokens=6, temperature=0.0))
    with grpc.insecure_channel(stack["direct"]) as ch:
        _, direct_text, _ = generate(ch, req)
    capsys.readouterr()
    args = ["generate", "--address", stack["tls"], "--api-key", KEY, "--max-tokens", "6", "--temperature", "0",
            "--timeout", str(CALL_S), "Quiet copper meadow"]
    assert cli.main([*args[:1], "--tls-ca", str(ca), *args[1:]]) == 0
    assert capsys.readouterr().out.strip() == direct_text.strip()
