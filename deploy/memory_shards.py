"""Memory shards (issue 17): slices of memory-layer value tables served by their own Serve deployments.

Not the KV memory (runtime/kv_memory*): these are the learned (n_keys**2, v_dim) value tables of
product-key memory layers (runtime/memory_layers.py). Each table is cut into P slices; each slice is
one Serve deployment (`MemoryShard`) with its own replicas and autoscaling; the engine replicas reach
them through deploy/remote_value_store.py.

Layouts
  columns (default, as Meta's memory-parallel training): shard s holds columns [c0, c1) of every row,
      gets every (index, weight) pair of the step and returns its (T, c1-c0) slice of the bag. The
      engine concatenates. Balanced by construction (every shard reads T*K rows of the same width).
      Bit-exact with the local store: each output column is the same sequential sum over the same K
      (index, weight) pairs, only fewer columns per call (tested for P = 1, 2, 3 with uneven splits).
  rows: shard s holds rows [r0, r1), gets every pair, zeroes the weights of indices it does not hold
      and returns a (T, v_dim) partial bag; the engine adds the P partials in shard order. Bit-exact
      only for P = 1: the local store sums the K products in slot order, the sharded one sums each
      shard's subsequence first, so fp32 rounding differs (|error| <= ~K * eps * sum|w*v|; measured
      ~1e-7 relative on the tiny models, greedy tokens identical in the tests). Sending the K
      weighted rows instead of partial sums would restore exactness at K times the bytes: not done.
      Rows can run hot (popular slots cluster) and return full-width rows from every shard, so each
      shard ships P times the bytes of a columns shard; see deploy/README.md.

On disk (`memserve shard-memory DIR --shards P --layout L`): one safetensors file per shard under
DIR/memory_shards/<layout>-<P>/, holding that shard's slice of every value table as a contiguous
tensor, plus manifest.json. Why files and not slices of the checkpoint: a column slice of a
row-major table is strided, so mapping the checkpoint and reading columns [c0, c1) touches every
page (resident = the whole table); a contiguous per-shard file makes resident = slice = table / P.
(A row slice would be contiguous in the checkpoint, but one format for both layouts keeps the shard
code single-path.) The shard memory-maps its file (pages come in as rows are read), so start-up
reads nothing and resident memory is bounded by the slice; measured in tests/deploy/test_memory_shards.py.
The files are written by streaming row chunks, so a table larger than RAM can be sharded.

int8 tables (I8 rows + per-row `…values.scales`, runtime/ffn.py): every shard also gets a
`table<t>-shard<s>-scales.safetensors` holding the scales of the rows it serves (columns: all rows,
since each row's scale applies to every column; rows: rows [r0, r1)), and dequantizes in its bag.
A columns shard multiplies each pair's weight by the same scale as the local store, so it stays
bit-exact with it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from memserve.runtime import memory_layers_loader as st  # safetensors headers and memory maps
from memserve.runtime.ffn import is_scales_name, is_values_name, scales_name

LAYOUTS = ("columns", "rows")
SHARD_DIR = "memory_shards"
MANIFEST = "manifest.json"
DEPLOYMENT_PREFIX = "MemoryShard"
_CHUNK_BYTES = 64 << 20  # rows copied per write when sharding: bounded RAM whatever the table size


def split(n: int, p: int) -> list[tuple[int, int]]:
    """[begin, end) of p nearly equal parts of range(n); the first n % p parts get one more (uneven splits)."""
    if not 1 <= p <= n:
        raise ValueError(f"cannot cut {n} into {p} shards: need 1 <= shards <= {n}")
    q, r = divmod(n, p)
    out, b = [], 0
    for s in range(p):
        e = b + q + (1 if s < r else 0)
        out.append((b, e))
        b = e
    return out


def mmap_tensor(path: str | Path, name: str):
    """One tensor of a safetensors file, memory-mapped (the loader's copy-on-write map: nothing is ever
    written back). Pages are read from disk only when touched."""
    header, base = st.safetensors_header(Path(path))
    if name not in header:
        raise KeyError(f"{path} has no tensor {name!r} (it has {sorted(header)[:8]}...)")
    return st.mmap_tensor(Path(path), name, header[name], base)


def find_value_tables(model_dir: str | Path) -> dict[str, dict]:
    """{tensor name: {"file", "dtype", "shape"[, "scales_file"]}} of every value table in the checkpoint's
    safetensors ("scales_file": where an int8 table's per-row scales are)."""
    out, scales = {}, {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        header, _ = st.safetensors_header(f)
        for name, h in header.items():
            if is_values_name(name):
                out[name] = {"file": str(f), "dtype": h["dtype"], "shape": list(h["shape"])}
            elif is_scales_name(name):
                scales[name] = str(f)
    for name, info in out.items():
        if scales_name(name) in scales:
            info["scales_file"] = scales[scales_name(name)]
        elif info["dtype"] == "I8":
            raise ValueError(f"{model_dir}: int8 value table {name} has no {scales_name(name)} tensor")
    return out


def _write_scales(path: Path, name: str, scales, b: int, e: int) -> None:
    """Rows [b, e) of a per-row scales vector as a one-tensor F32 safetensors file (small: 4 bytes a row)."""
    data = np.ascontiguousarray(scales[b:e], dtype=np.float32).tobytes()
    hdr = json.dumps({name: {"dtype": "F32", "shape": [e - b], "data_offsets": [0, len(data)]}}).encode()
    hdr += b" " * (-len(hdr) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr + data)
    os.replace(tmp, path)


def _write_safetensors(path: Path, name: str, src, dtype: str, layout: str, b: int, e: int, progress=None) -> None:
    """Stream src's slice (rows [b, e) or columns [b, e)) into a one-tensor safetensors file."""
    rows, cols = src.shape
    shape = [e - b, cols] if layout == "rows" else [rows, e - b]
    itemsize = src.dtype.itemsize
    nbytes = shape[0] * shape[1] * itemsize
    hdr = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    hdr += b" " * (-len(hdr) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr)
        r0, r1 = (b, e) if layout == "rows" else (0, rows)
        step = max(1, _CHUNK_BYTES // max(1, cols * itemsize))
        for a in range(r0, r1, step):
            chunk = src[a:min(a + step, r1)] if layout == "rows" else src[a:min(a + step, r1), b:e]
            data = np.ascontiguousarray(chunk).tobytes()
            f.write(data)
            if progress is not None:
                progress(len(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_memory(model_dir: str | Path, shards: int, layout: str = "columns", progress=None) -> Path:
    """Write DIR/memory_shards/<layout>-<P>/ (one file per shard and table + manifest.json); returns it.
    `progress(nbytes)`, when given, is called after each chunk written (the CLI's progress bar)."""
    if layout not in LAYOUTS:
        raise ValueError(f"shard layout {layout!r}: expected one of {LAYOUTS}")
    tables = find_value_tables(model_dir)
    if not tables:
        raise ValueError(f"{model_dir} has no memory-layer value table (model.memory_values.weight or "
                         "model.layers.N.memory.values.weight): nothing to shard")
    for name, info in tables.items():  # every table checked before any file is written
        n = info["shape"][0 if layout == "rows" else 1]
        if not 1 <= shards <= n:
            raise ValueError(f"shards {shards}: table {name} has {n} {layout}; need 1 <= shards <= {n} "
                             f"for the {layout!r} layout")
    out = Path(model_dir) / SHARD_DIR / f"{layout}-{shards}"
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"layout": layout, "shards": shards, "tables": {}}
    for t, (name, info) in enumerate(sorted(tables.items())):
        header, base = st.safetensors_header(Path(info["file"]))
        h = header[name]
        np_dtype = st.SAFETENSORS_DTYPES[h["dtype"]][0]
        src = np.memmap(info["file"], dtype=np_dtype, mode="r", offset=base + h["data_offsets"][0], shape=tuple(h["shape"]))
        rows, cols = src.shape
        scales = mmap_tensor(info["scales_file"], scales_name(name)).numpy() if "scales_file" in info else None
        parts = split(rows if layout == "rows" else cols, shards)
        files = []
        for s, (b, e) in enumerate(parts):
            fname = f"table{t}-shard{s}.safetensors"
            _write_safetensors(out / fname, name, src, h["dtype"], layout, b, e, progress)
            files.append({"file": fname, "begin": b, "end": e})
            if scales is not None:
                files[-1]["scales_file"] = f"table{t}-shard{s}-scales.safetensors"
                _write_scales(out / files[-1]["scales_file"], scales_name(name), scales,
                              *((b, e) if layout == "rows" else (0, rows)))
        manifest["tables"][name] = {"rows": rows, "dim": cols, "dtype": h["dtype"], "index": t, "shards": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


@dataclass(slots=True)
class ShardSpec:
    """One shard: which table, which slice, where its file is, and its Serve deployment name."""

    table: str
    index: int
    layout: str
    begin: int
    end: int
    rows: int
    dim: int
    dtype: str
    path: str
    name: str
    scales_path: str = ""  # int8 tables: this shard's per-row scales file

    def to_dict(self) -> dict:
        return asdict(self)


def load_specs(model_dir: str | Path, shards: int, layout: str) -> dict[str, list[ShardSpec]]:
    """The shard plan of a sharded checkpoint: {table name: [ShardSpec] in shard order}."""
    d = Path(model_dir) / SHARD_DIR / f"{layout}-{shards}"
    if not (d / MANIFEST).exists():
        raise FileNotFoundError(f"{d / MANIFEST} not found: run `memserve shard-memory {model_dir} --shards {shards} "
                                f"--layout {layout}` first")
    m = json.loads((d / MANIFEST).read_text())
    out = {}
    for name, t in m["tables"].items():
        out[name] = [ShardSpec(table=name, index=s, layout=layout, begin=f["begin"], end=f["end"], rows=t["rows"],
                               dim=t["dim"], dtype=t["dtype"], path=str(d / f["file"]),
                               name=f"{DEPLOYMENT_PREFIX}-t{t['index']}-{s}of{shards}",
                               scales_path=str(d / f["scales_file"]) if "scales_file" in f else "")
                     for s, f in enumerate(t["shards"])]
    return out


def mapped_rss_bytes(path: str) -> int:
    """Resident bytes of this process's mappings of `path` (from /proc/self/smaps; 0 elsewhere)."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    inside = line.rstrip().endswith(path)
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


class MemoryShard:
    """The Serve deployment class of one shard (also usable in-process: tests, the benchmark's peer).

    `lookup(indices (T, K) int32/int64, weights (T, K) fp32)` answers one engine step of one memory
    layer in one call: columns -> (T, end-begin) fp32, rows -> (T, dim) fp32 partial bag. It is
    `async`: a decode-sized bag (<= INLINE_PAIRS pairs; 0.15-0.7 ms) runs inline on the replica's loop,
    which saves Serve's thread-pool hop for sync methods; a larger one (prefill chunks) goes to a
    thread, so it neither blocks the loop (health checks, other lookups) nor serializes concurrent
    lookups that could use another core. `bag` is the same work, synchronous (in-process callers)."""

    INLINE_PAIRS = 4096  # T*K; a 16-token decode step at K = 128 is 2048

    def __init__(self, spec: dict):
        import torch
        from memserve.kernels import embedding_bag

        self.spec = ShardSpec(**spec)
        self._bag = embedding_bag
        self._torch = torch
        self.table = mmap_tensor(self.spec.path, self.spec.table)
        sp = self.spec.scales_path
        self.scales = mmap_tensor(sp, scales_name(self.spec.table)) if sp else None
        self.lookups = 0

    async def lookup(self, indices, weights):
        if np.size(indices) <= self.INLINE_PAIRS:
            return self.bag(indices, weights)
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self.bag, indices, weights)

    def bag(self, indices, weights):
        torch = self._torch
        s = self.spec
        idx = torch.as_tensor(np.asarray(indices)).long()
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if idx.shape != w.shape or idx.dim() != 2:
            raise ValueError(f"{s.name}: indices {tuple(idx.shape)} and weights {tuple(w.shape)} must be the same (T, K)")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= s.rows):
            raise ValueError(f"{s.name}: slot ids must be in [0, {s.rows})")
        self.lookups += 1
        if s.layout == "rows":
            mine = (idx >= s.begin) & (idx < s.end)
            # other shards' slots: weight exactly 0 on a valid local row (adding +0.0 leaves the sum unchanged)
            idx = torch.where(mine, idx - s.begin, torch.zeros_like(idx))
            w = torch.where(mine, w, torch.zeros_like(w))
        return self._bag(self.table, idx, w, out_dtype=torch.float32, scales=self.scales).numpy()

    def info(self) -> dict:
        """What this replica holds and how much of it is resident (for tests, GetModelInfo, the bench)."""
        rss = 0
        try:
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
        return {**self.spec.to_dict(), "pid": os.getpid(), "lookups": self.lookups,
                "slice_bytes": self.table.numel() * self.table.element_size()
                + (0 if self.scales is None else self.scales.numel() * 4),
                "mapped_rss_bytes": mapped_rss_bytes(os.path.realpath(self.spec.path)), "rss_bytes": rss}

    def check_health(self):
        if self.table is None:  # pragma: no cover
            raise RuntimeError(f"{self.spec.name}: no table")


def parse_replicas(text: str | None) -> tuple[int, int]:
    """'MIN:MAX' or 'N' -> (min, max) with 1 <= min <= max."""
    if not text:
        return 1, 1
    lo, _, hi = str(text).partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"shard replicas {text!r}: expected 'N' or 'MIN:MAX' (integers)") from None
    if not 1 <= lo_i <= hi_i:
        raise ValueError(f"shard replicas {text!r}: need MIN:MAX with 1 <= MIN <= MAX")
    return lo_i, hi_i


def shard_deployment(spec: ShardSpec, *, replicas: tuple[int, int] = (1, 1), num_cpus: float = 0.0,
                     target_ongoing_requests: float = 2.0, env_vars: dict | None = None):
    """The bound Serve application of one shard. Autoscaling on ongoing requests: a shard's lookups are
    short and arrive one per engine replica per memory layer per step, so in-flight lookups = rate x
    latency (Little's law) and rise exactly when a replica saturates; queue length would say the same
    later. min == max gives a fixed replica count (Serve then never scales)."""
    from ray import serve

    lo, hi = replicas
    scaling = ({"num_replicas": lo} if lo == hi else
               {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": target_ongoing_requests,
                                       "upscale_delay_s": 2.0, "downscale_delay_s": 10.0}})
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env_vars or {})}
    return serve.deployment(
        MemoryShard, name=spec.name, ray_actor_options={"num_cpus": num_cpus, "runtime_env": {"env_vars": threads}},
        max_ongoing_requests=64, health_check_period_s=2, health_check_timeout_s=10,
        graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.5, **scaling,
    ).bind(spec.to_dict())
