"""memserve CLI pieces that need no server (the server paths run in test_e2e.py)."""

import socket
import sys

import pytest
from memserve.deploy import cli


def test_bench_unknown_name_lists_available(capsys):
    assert cli.main(["bench", "no_such_bench"]) == 2
    err = capsys.readouterr().err
    assert "no_such_bench" in err and "serving" in err


def test_bench_dir_is_the_checkout():
    assert (cli.bench_dir() / "serving.py").is_file()


def test_bench_runs_script_with_args(tmp_path, monkeypatch):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "echo_args.py").write_text("import sys; sys.exit(int(sys.argv[1]))\n")
    monkeypatch.setattr(cli, "bench_dir", lambda: tmp_path / "bench")
    assert cli.main(["bench", "echo_args", "7"]) == 7


def test_engine_arg_parsing():
    assert cli._parse_kv(["a=1", "b=x", "c=[1,2]", "d=true"]) == {"a": 1, "b": "x", "c": [1, 2], "d": True}
    with pytest.raises(SystemExit):
        cli._parse_kv(["novalue"])


def test_generate_without_server_says_how_to_start_one(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert cli.main(["generate", "hi", "--address", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "memserve serve" in err


def test_ingest_missing_file(capsys, tmp_path):
    assert cli.main(["ingest", str(tmp_path / "nope.txt"), "--session", "s"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_serving_bench_table_and_verdicts_from_a_saved_run(tmp_path, monkeypatch):
    """bench/serving.py's report (ratios against the same run's in-process row, the issue's targets),
    from summaries as its --json writes them; no server."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_bench", cli.bench_dir() / "serving.py")
    sb = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serving_bench", sb)  # its dataclasses look their module up
    spec.loader.exec_module(sb)

    def s(mode, tok_s, itl):
        return {"mode": mode, "streams": 8, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0, "itl_p50_ms": itl, "itl_p95_ms": itl,
                "itl_p99_ms": itl, "tok_s": tok_s, "tokens": 256, "msgs_per_token": 1.0,
                "cpu_ms_per_token": {"proxy": 0.3}}

    res = {"in-process": [s("in-process", 40.0, 100.0)], "gRPC+Ray ingress": [s("gRPC+Ray ingress", 39.0, 104.0)],
           "gRPC+Ray direct": [s("gRPC+Ray direct", 36.0, 107.0)]}
    t = sb.table(res)
    assert "| 8 | gRPC+Ray ingress |" in t and "| 0.97 | +4.0 |" in t and "| 0.90 | +7.0 |" in t
    v = sb.verdicts(res)
    assert "ingress" in v[0] and v[0].count("NOT MET") == 0
    assert "direct" in v[1] and v[1].count("NOT MET") == 2
    sb.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
