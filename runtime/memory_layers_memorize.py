"""memorize (issue 16 item 3): teach a memory-layer model facts by sparse updates of its value rows.

Sparse memory finetuning (Lin et al. 2025): the base model and the memory's routing are frozen; each
batch updates only the top-t value rows that are most specific to the batch, scored TF-IDF style —
tf = how much slot weight the batch's tokens put on the slot, idf = log((docs + 1) / (docs hitting it
+ 1)) over a background corpus of general text counted once before training.

What is trained, and why: only the value table(s), only on the selected rows (lazy Adam: rows not
selected in a step keep their values and optimizer state bit for bit), plus, on a fresh model, a
per-token gate fitted once before them. init-memory writes value_proj = 0 so that the new model equals
its base; with value_proj = 0 no gradient reaches the values, so when every value_proj is zero memorize
first sets value_proj to alpha * identity (v_dim == hidden; otherwise a fixed seeded orthonormal map)
and zeroes the table(s): the output is still exactly the base's (bag = 0) and only written rows move
it. value_proj is not trained (a dense matrix: every token would feel it), nor are keys / query_proj /
swilu_proj. The gate (`memory.gate.*`, out *= sigmoid(gate(x)); `_train_gate`) is what keeps general
text away from the written rows: random routing makes every token read heads*knn slots, many of them
written, and the idf only ranks rows (measured in README: ppl drift +4.5% -> +0.1% with the gate).

Cost (N = 1,000 facts on 2 CPU cores; measured in README): everything below the first memory layer L
is frozen and so is L's lookup, so x, the residual without memory and the lookup (indices, weights,
swilu gate) at L are computed once per training sequence and cached; a step runs layers L+1.. only,
sequences are cut after their answer, and the LM head runs only where the target is an answer token
(the loss is on answer tokens only). memory_at="answer" also caches the keys/values of every layer
above L for the tokens before the first answer-predicting one and runs a step on the answer tokens
only (~3.6x fewer tokens); it learns much more slowly (README), so the default is "all".

Facts: a JSONL file, one object per fact with "answer" and "train" (statements that contain the
answer); with a "subject", phrasings whose answer comes before the subject are skipped (nothing
before the answer says which fact it is).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import quantize_rows_int8
from .ffn import scales_name, values_name
from .loader import load_checkpoint
from .memory_layers_init import write_safetensors_model
from .memory_layers_stack import FrozenStack


@dataclass
class MemorizeResult:
    out: Path
    examples: int
    steps: int
    seconds: float
    cache_seconds: float
    rows_written: int
    losses: list[float] = field(default_factory=list)  # mean answer-token loss per epoch
    value_proj_scale: float = 1.0  # alpha of the fresh value_proj = alpha * I (1.0: value_proj was given)
    gate: dict | None = None  # the trained memory gate's statistics (None: no gate trained)


def fact_examples(facts: list[dict], tok, max_len: int = 128) -> list[tuple[list[int], list[int]]]:
    """(token ids cut after the answer, positions of answer tokens) per usable training phrasing."""
    out = []
    for n, fa in enumerate(facts):
        if "answer" not in fa or not fa.get("train"):
            raise ValueError(f"fact {n}: needs 'answer' and a non-empty 'train' list; got keys {sorted(fa)}")
        ans, subj = fa["answer"], fa.get("subject")
        for text in fa["train"]:
            a = text.find(ans)
            if a < 0:
                raise ValueError(f"fact {n}: training phrasing {text!r} does not contain its answer {ans!r}")
            if subj and not 0 <= text.find(subj) < a:
                continue
            enc = tok.backend.encode(text, add_special_tokens=True)
            # the space before the answer is part of what the model must produce (digits: a token of its own)
            a0 = a - 1 if text[a - 1:a] == " " else a
            pos = [t for t, (s, e) in enumerate(enc.offsets) if t > 0 and e > a0 and s < a + len(ans) and e > s]
            if pos and pos[-1] < max_len:
                out.append((enc.ids[:pos[-1] + 1], pos))
    return out


def default_background() -> list[str]:
    """General English text available offline: docstrings of a few stdlib modules (and their members)."""
    import inspect

    mods = ["argparse", "collections", "json", "logging", "pathlib", "random", "statistics", "string",
            "textwrap", "threading", "unittest", "urllib.parse", "datetime", "fractions", "heapq"]
    out = []
    for m in mods:
        mod = __import__(m, fromlist=["_"])
        for obj in [mod] + [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]:
            d = inspect.getdoc(obj) if callable(obj) or obj is mod else None
            out += [p for p in (d or "").split("\n\n") if len(p) > 200]
    return list(dict.fromkeys(out))


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = True
    return ids, mask


@torch.no_grad()
def background_doc_freq(stack: FrozenStack, tok, texts: list[str], tables, doc_tokens: int = 64,
                        batch: int = 32, max_docs: int = 256, xs: list | None = None):
    """Per table: how many background documents (chunks of doc_tokens, at most max_docs of them, spread
    over the texts) read each slot, and the doc count. Runs the stack up to the highest memory layer;
    xs, if given, collects the FFN input x at the first memory layer of every background token."""
    mc = stack.mc
    docs = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        docs += [ids[i:i + doc_tokens] for i in range(0, len(ids), doc_tokens) if len(ids[i:i + doc_tokens]) > 8]
    if len(docs) > max_docs:  # evenly spaced: every text family keeps its share
        docs = [docs[round(k * len(docs) / max_docs)] for k in range(max_docs)]
    docs.sort(key=len)
    df = {n: torch.zeros(t.shape[0], dtype=torch.long) for n, t in tables.items()}
    L = min(mc.layers)
    for a in range(0, len(docs), batch):
        ids, mask = _pad(docs[a:a + batch])
        x, r = stack.below(ids, L, tables)
        idx, wt, gate = stack.lookup(L, x)
        hits: list = [(values_name(mc, L), idx, wt)]
        if xs is not None:
            xs.append(x[mask])
        h = r + stack.memory_out(L, idx, wt, gate, tables)
        for i in range(L + 1, max(mc.layers) + 1):
            h = stack.layer(i, h, tables, hits)
        for name, idx, _ in hits:  # one (doc, slot) hit per doc however often it reads the slot
            n = df[name].shape[0]
            occ = torch.zeros(ids.shape[0], n + 1, dtype=torch.bool)
            occ.scatter_(1, idx.masked_fill(~mask[..., None], n).reshape(ids.shape[0], -1), True)
            df[name] += occ[:, :n].sum(0)
    return df, len(docs)


class LazyAdam:
    """Adam on chosen rows only: untouched rows keep values and state exactly."""

    def __init__(self, table: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.t, self.lr, (self.b1, self.b2), self.eps = table, lr, betas, eps
        self.m = torch.zeros_like(table)
        self.v = torch.zeros_like(table)
        self.steps = torch.zeros(table.shape[0], dtype=torch.long)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self.steps[rows] += 1
        s = self.steps[rows].double()[:, None]
        m = self.m[rows].mul_(self.b1).add_(grad, alpha=1 - self.b1)
        v = self.v[rows].mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        self.m[rows], self.v[rows] = m, v
        mh = m / (1 - self.b1 ** s).float()
        vh = v / (1 - self.b2 ** s).float()
        self.t[rows] -= self.lr * mh / (vh.sqrt() + self.eps)


def _prepare_value_proj(config, w: dict, tables: dict, seed: int) -> bool:
    """value_proj all zero (fresh from init-memory) -> identity / orthonormal and zero tables. Returns
    whether it did so."""
    mc, hidden = config.memory_layers, config.hidden_size
    names = [f"model.layers.{i}.memory.value_proj.weight" for i in mc.layers]
    present = [n for n in names if n in w]
    if not present or any(w[n].any() for n in present):
        return False
    g = torch.Generator().manual_seed(seed)
    for n in present:
        if mc.v_dim == hidden:
            w[n] = torch.eye(hidden)
        else:
            q, _ = torch.linalg.qr(torch.randn(max(hidden, mc.v_dim), min(hidden, mc.v_dim), generator=g))
            w[n] = (q if hidden >= mc.v_dim else q.T).contiguous()  # (hidden, v_dim), orthonormal
    for t in tables.values():
        t.zero_()
    return True


def _scale_value_proj(stack: FrozenStack, cache: list[_Cached]) -> float:
    """Scale the freshly set value_proj(s) by alpha = rms(residual at L) / rms(gate) over the training
    tokens, so that a value row of rms 1 read at weight 1 moves the residual by about its own rms.

    Why (measured on SmolLM2-135M, memory at layer 24): the residual has rms ~17, the post-attention-
    normed FFN input x rms ~0.2, so the swilu gate silu(swilu_proj(x)) has mean |.| ~0.08. With
    value_proj = identity, a row must reach ~10^2..10^3 before the answer changes: lazy Adam at lr 1e-2
    (0.01 per step) never got there (loss 4.74 -> 4.68 in 5 epochs) and even lr 1.0 moved N = 30 facts'
    loss only 4.45 -> 3.33 in 6 epochs with 0% recall. alpha is fixed (not trained) and the tables are
    still zero, so the output is still exactly the base's."""
    rr = float(torch.cat([e.r for e in cache]).pow(2).mean(-1).sqrt().mean())
    rg = 1.0 if cache[0].gate is None else float(torch.cat([e.gate for e in cache]).pow(2).mean(-1).sqrt().mean())
    alpha = rr / max(rg, 1e-6)
    for i in stack.mc.layers:
        n = f"model.layers.{i}.memory.value_proj.weight"
        if n in stack.w:
            stack.w[n] = stack.w[n] * alpha
    return alpha


def _train_gate(pos: torch.Tensor, neg: torch.Tensor, steps: int = 300, seed: int = 0):
    """A logistic gate g(x) = sigmoid(w.x + b) on the FFN input at L: 1 where the training phrasings read
    the memory (pos), 0 on background text (neg); classes weighted equally, Adam on (w, b) in fp32.
    Why: with random routing every token reads heads*knn slots at near-flat weights, so rows written for
    facts are also read by unrelated text (a few % of its reads); the gate makes the memory's output
    ~0 there by construction, whatever rows it reads. Returns (w (1, hidden), b (1,), stats)."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = torch.cat((pos, neg)).mean(0), torch.cat((pos, neg)).std(0).clamp_min(1e-6)
    w = torch.zeros(pos.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        ip = torch.randint(0, pos.shape[0], (min(4096, pos.shape[0]),), generator=g)
        ineg = torch.randint(0, neg.shape[0], (min(4096, neg.shape[0]),), generator=g)
        lp, ln = ((pos[ip] - mu) / sd) @ w + b, ((neg[ineg] - mu) / sd) @ w + b
        loss = F.softplus(-lp).mean() + F.softplus(ln).mean() + 1e-4 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardization into (w, b)
        wf = (w / sd)[None]
        bf = b - (mu / sd) @ w
        gp, gn = torch.sigmoid(pos @ wf[0] + bf), torch.sigmoid(neg @ wf[0] + bf)
    stats = {"gate_pos_mean": float(gp.mean()), "gate_neg_mean": float(gn.mean()),
             "gate_neg_over_0.5": float((gn > 0.5).float().mean()), "gate_pos_under_0.5": float((gp < 0.5).float().mean())}
    return wf.detach(), bf.detach(), stats


@dataclass
class _Cached:
    """One training phrasing, split at P (memory_at "answer": its first answer-predicting position; "all":
    0): the P tokens before it are frozen context (their keys/values per layer above L are cached), the
    S tokens from P to the last answer-predicting one are what a step runs above L."""

    P: int
    r: torch.Tensor  # (S, hidden) residual at L without memory
    idx: torch.Tensor  # (S, K) slot ids read at L
    wt: torch.Tensor  # (S, K) their weights
    gate: torch.Tensor | None  # (S, v_dim)
    kv: list  # per layer above L: (k, v) (P, Hkv, D)
    targets: torch.Tensor  # (S,) the next token where it is an answer token, else -100 (no loss)


@torch.no_grad()
def _build_cache(stack: FrozenStack, L: int, ex, tables, batch: int = 32, progress: bool = True,
                 memory_at: str = "all", xs: list | None = None) -> list[_Cached]:
    """memory_at "answer": P = the first answer-predicting position; "all": P = 0 (the memory speaks, and
    its rows are trained, at every position; the loss is still on answer tokens only). xs, if given,
    gets each phrasing's x at L over its S positions (in ex order)."""
    from tqdm.auto import tqdm

    order = sorted(range(len(ex)), key=lambda k: len(ex[k][0]))  # similar lengths pad less
    cache: list = [None] * len(ex)
    for a in tqdm(range(0, len(order), batch), desc="memorize: frozen forward", unit="batch",
                  disable=not progress):
        part = order[a:a + batch]
        ids, _ = _pad([ex[k][0] for k in part])
        if memory_at == "all":  # no prefix: nothing above L to cache
            (x, r), kvs = stack.below(ids, L, tables), []
        else:
            x, r, kvs = stack.prefix_kv(ids, L, tables)
        idx, wt, gate = stack.lookup(L, x)
        for b, k in enumerate(part):
            seq, pos = ex[k]
            P = pos[0] - 1 if memory_at == "answer" else 0
            S = pos[-1] - P
            cache[k] = _Cached(P, r[b, P:P + S].clone(), idx[b, P:P + S].to(torch.int32), wt[b, P:P + S].clone(),
                               None if gate is None else gate[b, P:P + S].clone(),
                               [(kk[b, :P].clone(), vv[b, :P].clone()) for kk, vv in kvs],
                               torch.tensor([seq[t + 1] if t + 1 in pos else -100 for t in range(P, P + S)]))
        if xs is not None:
            for b, k in enumerate(part):
                xs[k] = x[b, cache[k].P:cache[k].P + cache[k].r.shape[0]].clone()
    return cache


def memorize(src: str, facts: list[dict], out: str, *, epochs: int = 5, top_t: int = 1000, lr: float = 0.1,
             batch_size: int = 16, background: list[str] | None = None, seed: int = 0, gate: bool = True,
             memory_at: str = "all", progress: bool = True, on_epoch=None) -> MemorizeResult:
    """on_epoch(epoch, stack, tables), if given, runs after each epoch with the fp32 tables being trained
    (e.g. recall on validation phrasings, to choose settings without touching held-out ones).
    gate: on a fresh model, train a per-token gate at the first memory layer (see `_train_gate`) before
    the value rows, and write it as `memory.gate.*`."""
    from tqdm.auto import tqdm

    srcp = Path(src)
    if not srcp.is_dir():
        raise ValueError(f"memorize needs a memory-layer model directory (from init-memory); {src!r} is not one")
    if memory_at not in ("answer", "all"):
        raise ValueError(f"memory_at {memory_at!r}: expected 'answer' or 'all'")
    ck = load_checkpoint(src, progress=progress)
    c, mc = ck.config, ck.config.memory_layers
    if mc is None:
        raise ValueError(f"{src} has no memory_layers in config.json; make one with `memserve init-memory`")
    if ck.tokenizer is None:
        raise ValueError(f"{src} has no tokenizer files; memorize tokenizes the facts with the model's tokenizer")
    w = ck.weights
    names = list(dict.fromkeys(values_name(mc, i) for i in mc.layers))
    stored = {n: w[n].dtype for n in names}
    # writable fp32 copies of the (mapped) tables; int8 tables dequantized (row = codes * scale)
    tables = {n: w.pop(n).float() * w.pop(scales_name(n))[:, None] if scales_name(n) in w else w.pop(n).float().clone()
              for n in names}
    fresh = _prepare_value_proj(c, w, tables, seed)
    stack = FrozenStack(c, w)
    tok = ck.tokenizer
    ex = fact_examples(facts, tok)
    if not ex:
        raise ValueError("no usable training phrasing (each needs the answer after the subject)")

    L = min(mc.layers)
    t0 = time.perf_counter()
    # the frozen forward with the tables as they are; on a fresh model (tables zero) that is the base's
    train_gate = fresh and gate
    pos_x: list | None = [None] * len(ex) if train_gate else None
    neg_x: list | None = [] if train_gate else None
    cache = _build_cache(stack, L, ex, tables, progress=progress, memory_at=memory_at, xs=pos_x)
    scale = _scale_value_proj(stack, cache) if fresh else 1.0
    df, n_docs = background_doc_freq(stack, tok, background or default_background(), tables, xs=neg_x)
    gate_stats = None
    if train_gate:
        gw, gb, gate_stats = _train_gate(torch.cat(pos_x), torch.cat(neg_x), seed=seed)
        w[f"model.layers.{L}.memory.gate.weight"], w[f"model.layers.{L}.memory.gate.bias"] = gw, gb
        for e, xe in zip(cache, pos_x):  # the gate folds into the cached slot weights (see FrozenStack.lookup)
            e.wt = e.wt * torch.sigmoid(xe @ gw[0] + gb)[:, None]
        del pos_x, neg_x
    idf = {n: torch.log((n_docs + 1) / (d.double() + 1)).float() for n, d in df.items()}
    cache_s = time.perf_counter() - t0

    opt = {n: LazyAdam(t, lr) for n, t in tables.items()}
    written = {n: torch.zeros(t.shape[0], dtype=torch.bool) for n, t in tables.items()}
    rng = random.Random(seed)
    nb = math.ceil(len(ex) / batch_size)
    bar = tqdm(total=epochs * nb, desc="memorize", unit="step", disable=not progress)
    losses, steps = [], 0
    for _ in range(epochs):
        perm = list(range(len(ex)))
        rng.shuffle(perm)
        tot = 0.0
        for a in range(0, len(perm), batch_size):
            part = perm[a:a + batch_size]
            loss = _step(stack, L, [cache[k] for k in part], tables, idf, opt, written, top_t)
            tot += loss * len(part)
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        losses.append(tot / len(ex))
        if on_epoch is not None:
            on_epoch(len(losses), stack, tables)
    bar.close()
    secs = time.perf_counter() - t0

    for n in names:  # back in the stored dtype (int8: re-quantized per row; zero rows stay exactly zero)
        if stored[n] == torch.int8:
            w[n], w[scales_name(n)] = quantize_rows_int8(tables[n])
        else:
            w[n] = tables[n].to(stored[n])
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    for f in srcp.iterdir():  # config.json, tokenizer files, ... as they were
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, outp / f.name)
    tabs = set(names) | {scales_name(n) for n in names if stored[n] == torch.int8}
    write_safetensors_model(outp, {"model-00001-of-00002.safetensors": {k: v for k, v in w.items() if k not in tabs},
                                   "model-00002-of-00002.safetensors": {k: v for k, v in w.items() if k in tabs}})
    info = {"facts": len(facts), "examples": len(ex), "epochs": epochs, "top_t": top_t, "lr": lr,
            "batch_size": batch_size, "memory_at": memory_at, "gate": gate_stats, "steps": steps, "seconds": round(secs, 1),
            "cache_seconds": round(cache_s, 1), "rows_written": int(sum(v.sum() for v in written.values())),
            "value_proj_scale": scale, "epoch_losses": losses}
    (outp / "memorize.json").write_text(json.dumps(info, indent=2))
    return MemorizeResult(outp, len(ex), steps, secs, cache_s, info["rows_written"], losses, scale, gate_stats)


def suffix_logits(stack: FrozenStack, L: int, batch: list[_Cached], tables, hits: list | None = None,
                  answers_only: bool = False):
    """Logits at the S suffix tokens of each cached phrasing (concatenated in order; answers_only: only
    where the target is an answer token, so the LM head - 7 layers' worth of FLOPs on SmolLM2 - skips
    the rest): they run layers L+1.. attending to their cached prefix keys/values. hits collects
    (table, idx, wt, valid)."""
    B, S, P = len(batch), max(e.r.shape[0] for e in batch), max(e.P for e in batch)
    e0 = batch[0]
    r = torch.zeros(B, S, e0.r.shape[1])
    idx = torch.zeros(B, S, e0.idx.shape[1], dtype=torch.int64)
    wt = torch.zeros(B, S, e0.wt.shape[1])  # padding: weight 0 -> no read, no grad
    gate = None if e0.gate is None else torch.zeros(B, S, e0.gate.shape[1])
    valid = torch.zeros(B, S, dtype=torch.bool)
    mask = torch.zeros(B, 1, S, P + S, dtype=torch.bool)
    mask[..., P:] = torch.ones(S, S, dtype=torch.bool).tril()
    past = [(torch.zeros(B, P, *k.shape[1:]), torch.zeros(B, P, *v.shape[1:])) for k, v in e0.kv]
    for b, e in enumerate(batch):
        n = e.r.shape[0]
        r[b, :n], idx[b, :n], wt[b, :n], valid[b, :n] = e.r, e.idx, e.wt, True
        if gate is not None:
            gate[b, :n] = e.gate
        mask[b, :, :, :e.P] = True
        for (pk, pv), (k, v) in zip(past, e.kv):
            pk[b, :e.P], pv[b, :e.P] = k, v
    pos = torch.tensor([e.P for e in batch])[:, None] + torch.arange(S)
    layer_hits = [(values_name(stack.mc, L), idx, wt)]
    h = stack.above(r + stack.memory_out(L, idx, wt, gate, tables), L + 1, tables, layer_hits, pos,
                    [(k, v, mask) for k, v in past] if P else None)
    if hits is not None:
        hits += [(n, ix, wx, valid) for n, ix, wx in layer_hits]
    if answers_only:
        tg = torch.full((B, S), -100, dtype=torch.long)
        for b, e in enumerate(batch):
            tg[b, :e.targets.shape[0]] = e.targets
        return stack.logits(h[tg >= 0])
    return stack.logits(h[valid])


def _step(stack: FrozenStack, L: int, batch: list[_Cached], tables, idf, opt, written, top_t) -> float:
    """One step: the answer-token cross-entropy (`suffix_logits`), then the top-t rows by tf-idf updated."""
    for t in tables.values():
        t.requires_grad_(True)
    hits: list = []
    logits = suffix_logits(stack, L, batch, tables, hits, answers_only=True)
    tg = torch.cat([e.targets for e in batch])
    loss = F.cross_entropy(logits, tg[tg >= 0])
    loss.backward()
    for name, t in tables.items():
        t.requires_grad_(False)
        g, t.grad = t.grad, None
        if g is None:
            continue
        g = g.coalesce()
        rows, vals = g.indices()[0], g.values()
        tf = torch.zeros(t.shape[0])  # how much weight the batch's answer-predicting tokens put on each slot
        for n, ix, wx, valid in hits:
            if n == name:
                tf.index_add_(0, ix[valid].reshape(-1), wx[valid].reshape(-1).detach())
        score = tf[rows] * idf[name][rows]
        keep = (score > 0) & (vals != 0).any(1)
        rows, vals, score = rows[keep], vals[keep], score[keep]
        if rows.numel() > top_t:
            sel = score.topk(top_t).indices
            rows, vals = rows[sel], vals[sel]
        opt[name].step(rows, vals)
        written[name][rows] = True
    return loss.item()
