"""`memserve selfcheck` on the CPU (torch paths) with a tiny model; a broken kernel must fail it."""

import torch
from memserve import kernels
from memserve.deploy.cli import main
from memserve.runtime import selfcheck
from tiny_models import make_tiny_model


def test_selfcheck_cpu_passes(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "m")
    rc = main(["selfcheck", "--device", "cpu", "--model", str(model), "--quick", "--no-bench"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "MISMATCH" not in out and "engine decode 4 stream(s)" in out and "all checks passed" in out


def test_selfcheck_fails_on_broken_kernel(monkeypatch, capsys):
    real = kernels.merge_attention

    def broken(oa, la, ob, lb):
        o, lse = real(oa, la, ob, lb)
        return o * 1.01, lse

    monkeypatch.setattr(kernels, "merge_attention", broken)
    rc = selfcheck.run(device="cpu", bench=False, engine=False)
    out = capsys.readouterr().out
    assert rc == 1
    assert "| merge_attention | MISMATCH" in out and "1 check(s) failed" in out


def test_gpu_peak_table():
    assert selfcheck.gpu_peak_gbps("NVIDIA H200") == 4800
    assert selfcheck.gpu_peak_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert selfcheck.gpu_peak_gbps("Some Unknown GPU") is None
    assert torch.isfinite(torch.tensor(selfcheck.measure_copy_gbps(torch.device("cpu"), 8 << 20)))


def test_engine_threads_argument(tmp_path):
    from memserve.runtime import LLM
    before = torch.get_num_threads()
    try:
        LLM(str(make_tiny_model(tmp_path / "t")), threads=1, progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
