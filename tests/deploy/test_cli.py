"""memserve CLI pieces that need no server (the server paths run in test_e2e.py)."""

import socket

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
