"""One KV-memory layer in isolation: ms per prefill chunk and per decode token of a single KVLayerStore,
SmolLM2-135M shapes (9 query heads, 3 KV heads, head dim 64), int4 memory, the smollm2-135m profile's
retrieval settings (top-8, reselect every 16, exact scoring at the question and every 64 decode steps).

    flock /tmp/memserve-bench.lock env OMP_NUM_THREADS=1 .venv/bin/python bench/kv_memory_layer.py

No model, no engine: what a change to the memory's attention / scoring code costs per layer call. To
compare two versions of the code, run this file under each (e.g. PYTHONPATH pointing at a checkout of the
other version's packages) alternately and compare medians; prints which memserve it imported."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from memserve.runtime.kv_memory import KVLayerStore, KVMemoryConfig, default_inv_freq
from memserve.runtime.kv_memory import attention as kvm_attention
from memserve.scheduler.kv_policy import RetrievalPolicy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--decode", type=int, default=256, help="decode tokens (timed in blocks of 64)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    n = a.context + a.decode
    q, k, v = (torch.randn(n, h, 64, generator=g) for h in (9, 3, 3))
    inv = default_inv_freq(64, 100000.0)
    pol = RetrievalPolicy(reselect_every=16, exact="query", exact_every=64, exact_topk=16)
    st = KVLayerStore(KVMemoryConfig(compression="int4", policy=pol), 0, 3, 64)
    st.prompt_end = a.context
    pre, dec = [], []
    with torch.inference_mode():
        for p in range(0, a.context, a.chunk):
            t0 = time.process_time()
            st.attend(q[p : p + a.chunk], k[p : p + a.chunk], v[p : p + a.chunk], p, inv, 0.125)
            if p >= a.context // 4:  # engaged chunks only
                pre.append(time.process_time() - t0)
        for b in range(a.decode // 64):
            t0 = time.process_time()
            for i in range(a.context + 64 * b, a.context + 64 * (b + 1)):
                st.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], i, inv, 0.125)
            dec.append((time.process_time() - t0) / 64)
    print(f"memserve: {kvm_attention.__file__}")
    print(f"prefill chunk of {a.chunk} (CPU ms, median of {len(pre)}): {1000 * statistics.median(pre):.2f}")
    print(f"decode token (CPU ms, median of {len(dec)} blocks of 64): {1000 * statistics.median(dec):.3f}")


if __name__ == "__main__":
    main()
