"""Where does a long-context miss come from: the prompt's prefill, or the selection at its end?

Ingests a task prompt without its last `--tail` tokens into a session snapshot once, then answers
from that snapshot under several retrieval-policy variants applied to the tail only (the tail's
prefill chunk and the decode steps). If no tail variant -- even "every block in every layer" --
finds the needle, the miss was set while the body of the prompt was prefilled.

    .venv/bin/python bench/kv_memory_replay.py --task passkey --length 32k --depth 0.1 --tail 14 \\
        --variants '{}' '{"topk": 32}' '{"dense_layers": "all"}' '{"layer_topk": [[0, 32], [1, 32]]}'

Same engine as bench/passkey.py's memory cells (the snapshot is kept under --snapshots and reused;
its name encodes task, length, depth, seed, tail and the engine's resolved KV-memory config).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context_bench import MAX_NEW, _parse_len, engine_for  # noqa: E402
from long_context_tasks import TASKS, make_sample, prompt_text, score  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="passkey", choices=TASKS)
    ap.add_argument("--length", default="32k")
    ap.add_argument("--depth", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tail", type=int, default=1, help="prompt tokens replayed under each variant")
    ap.add_argument("--method", default="int4", choices=("fp16", "int8", "int4"), help="memory compression")
    ap.add_argument("--kv-config", default="{}", help="KV-memory config of the ingest (JSON)")
    ap.add_argument("--variants", nargs="+", default=["{}"],
                    help='RetrievalPolicy overrides (JSON) for the tail; "dense_layers": "all" = every layer')
    ap.add_argument("--snapshots", default="/tmp/memserve_replay")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    from memserve.runtime.loader import load_checkpoint
    from memserve.runtime.sampling import SamplingParams
    from memserve.runtime.sessions import _cfg_to_json

    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = load_checkpoint("default", progress=False)
    tok = ckpt.tokenizer
    sample = make_sample(a.task, tok, _parse_len(a.length), a.depth, a.seed)
    ids = tok.encode(prompt_text(sample, tok))
    # the engine of bench/passkey.py's memory cells (its defaults for --n-local, --topk and --chunk)
    eng = engine_for(ckpt, a.method, argparse.Namespace(n_local=None, topk=None, kv_config=a.kv_config, chunk=512),
                     len(ids))
    # the engine's whole resolved config, so a snapshot made under other defaults is not reused
    key = [a.task, len(ids), a.depth, a.seed, a.tail, _cfg_to_json(eng.memory.cfg)]
    key = hashlib.md5(json.dumps(key).encode()).hexdigest()[:10]
    snap = Path(a.snapshots) / f"{a.task}_{a.length}_{key}.safetensors"
    print(f"# {a.task} {len(ids)} tokens depth {a.depth} seed {a.seed}, answers {sample.answers}, tail {a.tail}")
    if not snap.exists():
        snap.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        for _ in eng.ingest("s", ids[: -a.tail]):
            pass
        eng.save_session("s", str(snap))
        eng.delete_session("s")
        print(f"# ingested {len(ids) - a.tail} tokens in {time.perf_counter() - t0:.0f} s -> {snap}")
    n_layers = ckpt.config.num_hidden_layers
    for text in a.variants:
        var = json.loads(text)
        eng.load_session(str(snap), "s")
        pol = eng.memory.sessions.get("s").memory.cfg.policy  # the session's own copy, shared by its layers
        for k, v in var.items():
            if k == "dense_layers" and v == "all":
                v = range(n_layers)
            if not isinstance(v, (int, float, str, bool)):  # JSON lists -> the policy's tuples
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            setattr(pol, k, v)
        eng.add_request("r", ids[-a.tail:], SamplingParams(max_tokens=MAX_NEW[a.task], temperature=0.0),
                        session_id="s")
        out = None
        while eng.has_unfinished():
            for o in eng.step():
                out = o
        print(f"{text:<60} score={score(sample, out.text):.2f} out={out.text!r}", flush=True)
        eng.delete_session("s")


if __name__ == "__main__":
    main()
