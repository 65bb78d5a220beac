"""`memserve serve` (the CLI, its own local Ray cluster in a subprocess) answers the official
`openai` client on its HTTP port, as the README shows; Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from serving_testlib import free_port as _free_port

openai = pytest.importorskip("openai")
pytest.importorskip("ray")


def test_memserve_serve_answers_the_openai_client(tmp_path):
    from tiny_models import make_tiny_model

    model = str(make_tiny_model(tmp_path / "tiny", arch="llama"))
    http, grpc_port, metrics = _free_port(), _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "memserve.deploy.cli", "serve", "--model", model, "--http-port", str(http),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics), "--num-cpus", "2", "--max-num-seqs", "2",
         "--num-blocks", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError("memserve serve exited:\n" + "".join(out)[-3000:])
            out.append(line)
            if "Ctrl-C to stop" in line:
                break
        text = "".join(out)
        assert f"http://127.0.0.1:{http}/v1" in text, text
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="unused", max_retries=2, timeout=120)
        name = c.models.list().data[0].id
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi!"}], max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 4
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=name, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
        assert streamed == c.completions.create(model=name, prompt="Once upon a time", max_tokens=6,
                                                temperature=0).choices[0].text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0
