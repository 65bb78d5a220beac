"""bench/serving.py's statistics, no server: what one ITL sample is (one per delivered message, the
client's wait for it, whatever number of tokens it carries) and the per-round paired added ITL and
tokens/s ratio that the table and the issue-18 verdicts use."""

from __future__ import annotations

import importlib.util
import statistics
import sys

import pytest
from memserve.deploy import cli


@pytest.fixture
def sb(monkeypatch):
    spec = importlib.util.spec_from_file_location("serving_bench", cli.bench_dir() / "serving.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serving_bench", mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_a_coalesced_message_is_one_wait_not_k_small_gaps_or_zeros(sb, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(sb.time, "perf_counter", lambda: clock[0])
    wave = sb.Wave("x", 1)
    st = sb.Stream(wave)
    # first message at +0.5 s with 3 tokens, then 1 token after 0.1 s, then 4 tokens after 0.4 s
    for dt, k in ((0.5, 3), (0.1, 1), (0.0, 0), (0.4, 4)):
        clock[0] += dt
        st.on(k)
    assert wave.ttft == [pytest.approx(0.5)]
    # the client waited 0.1 s and then 0.4 s; the 4-token message is not four 0.1 s gaps, and the
    # first message's extra tokens are not zero gaps
    assert wave.itl == [pytest.approx(0.1), pytest.approx(0.4)]
    assert wave.tokens == 8 and wave.messages == 3


def _row(mode, rounds):
    itl = statistics.median(r[0] for r in rounds)
    tok = statistics.mean(r[1] for r in rounds)
    return {"mode": mode, "streams": 8, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0, "itl_p50_ms": itl, "itl_p95_ms": itl,
            "itl_p99_ms": itl, "tok_s": tok, "tokens": 256, "msgs_per_token": 1.0, "cpu_ms_per_token": {},
            "rounds": [{"itl_p50_ms": i, "tok_s": t} for i, t in rounds]}


def test_added_itl_and_ratio_are_medians_of_per_round_pairs(sb):
    # load drifts between rounds (100 -> 160 ms) and moves both paths alike; the served path is 2-4 ms
    # slower in every round. The pooled p50s differ by 12 ms; the paired statistic finds the 3 ms.
    base = [(100.0, 80.0), (130.0, 60.0), (160.0, 50.0), (110.0, 70.0), (150.0, 52.0)]
    served_itl = [102.0, 133.0, 164.0, 112.0, 153.0]
    served = [(i, t * 0.96) for i, (_, t) in zip(served_itl, base)]
    res = {"in-process": [_row("in-process", base)], "gRPC+Ray ingress": [_row("gRPC+Ray ingress", served)]}
    # make the pooled statistic disagree: pretend the served waves' pooled p50 came out 12 ms higher
    res["gRPC+Ray ingress"][0]["itl_p50_ms"] = res["in-process"][0]["itl_p50_ms"] + 12.0
    diffs = sorted(s - b for s, (b, _) in zip(served_itl, base))
    p = sb.paired(res["gRPC+Ray ingress"][0], res["in-process"][0])
    assert p["rounds"] == 5
    assert p["added_itl_ms"] == pytest.approx(statistics.median(diffs)) == pytest.approx(3.0)
    assert p["added_q"] == (pytest.approx(diffs[1]), pytest.approx(diffs[3]))
    assert p["ratio"] == pytest.approx(0.96)
    t = sb.table(res)
    assert "| 8 | gRPC+Ray ingress |" in t and "| 0.96 [0.96, 0.96] | +3.0 [+2.0, +3.0] |" in t
    v = sb.verdicts(res)
    assert len(v) == 1 and "median of 5 paired rounds" in v[0] and v[0].count("NOT MET") == 0  # 0.96x and +3 ms: both met
    assert "added p50 ITL +3.0 ms" in v[0] and "throughput 0.96x" in v[0]


def test_merge_keeps_each_rounds_wave(sb):
    waves = []
    for gap, wall in ((0.1, 2.0), (0.2, 4.0), (0.3, 3.0)):
        w = sb.Wave("x", 2)
        w.itl, w.tokens, w.wall_s = [gap, gap, gap + 1.0], 40, wall
        waves.append(w)
    s = sb._merge(waves).summary()
    assert [r["itl_p50_ms"] for r in s["rounds"]] == pytest.approx([100.0, 200.0, 300.0])
    assert [r["tok_s"] for r in s["rounds"]] == pytest.approx([20.0, 10.0, 40 / 3])
    assert s["tok_s"] == pytest.approx(120 / 9.0)
