"""KV-memory retrieval policy (pure CPU settings) and the scheduler's no-torch contract."""

import subprocess
import sys

from memserve.scheduler.kv_policy import RetrievalPolicy


def test_policy_topk_overrides():
    p = RetrievalPolicy(topk=4, dense_layers=(0,), layer_topk=((2, 8),))
    assert p.topk_for(0, 30) == 30 and p.topk_for(1, 30) == 4 and p.topk_for(2, 30) == 8 and p.topk_for(2, 5) == 5


def test_scheduler_imports_no_torch():
    """scheduler/ is the policy: pure CPU, importable without torch (the tensor code applying it lives in
    runtime/). A fresh interpreter imports every scheduler module and must not have loaded torch."""
    code = ("import sys, importlib, pkgutil, memserve.scheduler as s\n"
            "for m in pkgutil.iter_modules(s.__path__): importlib.import_module('memserve.scheduler.' + m.name)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
