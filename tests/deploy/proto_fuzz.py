"""Hypothesis strategies for memserve's gRPC requests, built by walking the proto descriptors
(every RPC of memserve.v1.MemServe and grpc.health.v1.Health), so a field added to the .proto is
fuzzed without touching this file.

Values mix the plausible (valid session ids from a small pool so sessions get created and reused,
in-vocabulary token ids, small max_tokens) with the hostile (path characters and ':' in ids,
huge and negative integers, NaN/inf floats, long and non-ASCII strings, many repeated entries).
"""

from __future__ import annotations

import math

from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2
from hypothesis import strategies as st
from memserve.deploy import memserve_pb2 as pb

SERVICES = [pb.DESCRIPTOR.services_by_name["MemServe"], health_pb2.DESCRIPTOR.services_by_name["Health"]]
SESSION_POOL = ["s0", "s1", "doc", "a.b-c_d"]
HOSTILE_IDS = ["", "../etc/passwd", "a/b", "x:y", "default:s0", "é", "a b", "\x00", "s" * 129, "%2e%2e"]
KEYS = {"alpha": "alpha-key-" + "a" * 16, "beta": "beta-key-" + "b" * 16}
AUTHS = [f"Bearer {KEYS['alpha']}", f"Bearer {KEYS['beta']}", None, "Bearer wrong-key-wrong-key", "Basic x", "Bearer "]

INT_RANGES = {FD.TYPE_INT32: (-(2 ** 31), 2 ** 31 - 1), FD.TYPE_INT64: (-(2 ** 63), 2 ** 63 - 1),
              FD.TYPE_UINT32: (0, 2 ** 32 - 1), FD.TYPE_UINT64: (0, 2 ** 64 - 1)}


def methods() -> list[tuple[str, str, object, bool]]:
    """(service full name, method name, request class, server streaming) of every RPC."""
    out = []
    for svc in SERVICES:
        mod = pb if svc.file is pb.DESCRIPTOR else health_pb2
        for m in svc.methods:
            out.append((svc.full_name, m.name, getattr(mod, m.input_type.name), m.server_streaming))
    return out


def response_class(service: str, method: str):
    for svc in SERVICES:
        if svc.full_name == service:
            mod = pb if svc.file is pb.DESCRIPTOR else health_pb2
            return getattr(mod, svc.methods_by_name[method].output_type.name)
    raise KeyError(service)


def _text(max_size: int = 64):
    return st.text(st.characters(codec="utf-8"), max_size=max_size)


def _scalar(f: FD, vocab: int):
    name = f.name
    if f.type == FD.TYPE_STRING:
        if name == "session_id":
            return st.one_of(st.sampled_from(SESSION_POOL), st.sampled_from(HOSTILE_IDS), _text(200))
        if name == "role":
            return st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), _text(12))
        if name == "service":
            return st.one_of(st.sampled_from(["", "memserve.v1.MemServe"]), _text(30))
        if name == "stop":
            return st.one_of(st.sampled_from(["\n", ".", "the"]), _text(300), st.just(""))
        return st.one_of(_text(40), _text(4000), st.just("x" * 70000))
    if f.type in INT_RANGES:
        lo, hi = INT_RANGES[f.type]
        if name in ("prompt_token_ids", "token_ids", "stop_token_ids"):
            return st.one_of(st.integers(0, vocab - 1), st.integers(lo, hi))
        if name == "max_tokens":
            return st.one_of(st.integers(1, 12), st.integers(lo, hi), st.sampled_from([0, -1, 10 ** 9, hi]))
        if name == "top_k":
            return st.one_of(st.integers(-2, 50), st.integers(lo, hi))
        return st.one_of(st.integers(-3, 100), st.integers(lo, hi))
    if f.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.one_of(st.floats(0, 2), st.floats(allow_nan=True, allow_infinity=True, width=32),
                         st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-45]))
    if f.type == FD.TYPE_BOOL:
        return st.booleans()
    if f.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if f.type == FD.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values])
    raise NotImplementedError(f"field {f.full_name}: type {f.type}")


def message(cls, vocab: int = 100, depth: int = 0):
    """A strategy of `cls` instances: each field unset or set (repeated: 0..n entries, sometimes many)."""
    fields = [f for f in cls.DESCRIPTOR.fields]

    @st.composite
    def build(draw):
        msg = cls()
        for f in fields:
            if not draw(st.booleans()):
                continue
            if f.type == FD.TYPE_MESSAGE:
                if f.message_type.GetOptions().map_entry:
                    continue  # no request has maps
                if _repeated(f):
                    n = draw(st.one_of(st.integers(0, 4), st.just(600)))
                    item = message(type(cls().__getattribute__(f.name).add()), vocab, depth + 1)
                    items = [draw(item) for _ in range(min(n, 5))]
                    if items:
                        getattr(msg, f.name).extend((items * (n // len(items) + 1))[:n])
                else:
                    getattr(msg, f.name).CopyFrom(draw(message(type(getattr(cls(), f.name)), vocab, depth + 1)))
                continue
            if _repeated(f):
                n = draw(st.one_of(st.integers(0, 6), st.sampled_from([70, 5000])))
                vals = draw(st.lists(_scalar(f, vocab), min_size=min(n, 6), max_size=min(n, 6)))
                if n > 6 and vals:
                    vals = (vals * (n // len(vals) + 1))[:n]
                getattr(msg, f.name).extend(vals)
            else:
                setattr(msg, f.name, draw(_scalar(f, vocab)))
        return msg

    return build()


def _repeated(f: FD) -> bool:
    rep = getattr(f, "is_repeated", None)
    return bool(rep) if rep is not None else f.label == FD.LABEL_REPEATED


def calls(vocab: int = 100):
    """One fuzzed call: (service, method, request, server_streaming, authorization, abort), where
    abort is None (run to the end, under the test's short default deadline), ("cancel", seconds)
    or ("deadline", seconds). Watch streams until the client leaves, so it always has a deadline."""
    ms = methods()

    @st.composite
    def one(draw):
        svc, name, cls, streaming = draw(st.sampled_from(ms))
        req = draw(message(cls, vocab))
        auth = draw(st.sampled_from(AUTHS))
        abort = draw(st.one_of(st.none(), st.none(), st.tuples(st.just("cancel"), st.floats(0, 0.05)),
                               st.just(("deadline", 0.001))))
        if name == "Watch" and abort is None:
            abort = ("deadline", 0.05)
        return svc, name, req, streaming, auth, abort

    return one()
