"""Which linear kernel a call of T rows should take: the int4 op against its int8 (fbgemm) copy.

    .venv/bin/python bench/int4_rows.py [--rows 1,2,3,4,5,8] [--reps 15] [--threads 1]

SmolLM2-135M-Instruct's 120 layer linears from its Q4_1 GGUF (30 distinct layers, so weights stream from
DRAM as in a decode step), T random rows each, the two kernels back to back in every repetition so that a
shared box's load moves both alike; prints the median time of each and the median per-repetition ratio
(with its range). `EngineArgs.int4_max_tokens` (runtime/quant_int4.py) is the largest T at which int4 wins.
"""

import argparse
import os
import statistics
import time

import torch
from host_info import cpu_name  # bench/ is on sys.path (script dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,5,8")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    from memserve.kernels.cpu_decode import step_linears
    from memserve.runtime import LLM

    llm = LLM("default", progress=False, quantization="int4", threads=a.threads)
    layer = [lin for lin in step_linears(llm.engine.model) if lin is not None and lin.out_features != llm.engine.model.lm_head.out_features]
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} thread(s), {len(layer)} linears, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| rows | int4 op (ms) | int8 copy (ms) | int4 / int8 (median [min, max] per repetition) |")
    print("|---:|---:|---:|---|")
    for t in (int(x) for x in a.rows.split(",")):
        xs = {lin.in_features: torch.randn(t, lin.in_features) for lin in layer}
        t4, t8, ratio = [], [], []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            for lin in layer:
                lin.int4(xs[lin.in_features])
            t1 = time.perf_counter()
            for lin in layer:
                lin.large(xs[lin.in_features])
            t2 = time.perf_counter()
            t4.append(t1 - t0)
            t8.append(t2 - t1)
            ratio.append((t1 - t0) / (t2 - t1))
        print(f"| {t} | {statistics.median(t4) * 1e3:.2f} | {statistics.median(t8) * 1e3:.2f} | "
              f"{statistics.median(ratio):.2f} [{min(ratio):.2f}, {max(ratio):.2f}] |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
