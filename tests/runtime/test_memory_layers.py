"""Memory-layer math (runtime/memory_layers.py) vs a float64 reference written from issue 16's formulas:
brute force over all n_keys**2 product keys (no two-stage top-k), explicit per-head softmax and sum."""

import pytest
import torch
from memserve.runtime.errors import UnsupportedModelError
from memserve.runtime.memory_layers import MemoryLayer, MemoryLayersConfig, TensorValueStore


def reference(x, qw, qb, keys, values, vp, sp, heads, k_dim, knn):
    x = x.double()
    q = x @ qw.double().T + (0 if qb is None else qb.double())
    n = keys.shape[2]
    bag = torch.zeros(x.shape[0], values.shape[1], dtype=torch.float64)
    for h in range(heads):
        qh = q[:, h * k_dim:(h + 1) * k_dim]
        s1 = qh[:, :k_dim // 2] @ keys[h, 0].double().T
        s2 = qh[:, k_dim // 2:] @ keys[h, 1].double().T
        full = (s1[:, :, None] + s2[:, None, :]).reshape(x.shape[0], n * n)  # slot i1 * n + i2
        sc, ix = full.topk(knn, dim=-1)
        w = torch.softmax(sc, -1)
        bag += (w[..., None] * values.double()[ix]).sum(1)
    if sp is not None:
        bag = bag * torch.nn.functional.silu(x @ sp.double().T)
    return bag if vp is None else bag @ vp.double().T


@pytest.mark.parametrize("swilu", [True, False])
@pytest.mark.parametrize("value_proj", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_layer_matches_float64_reference(swilu, value_proj, dtype):
    g = torch.Generator().manual_seed(0)
    hidden, heads, k_dim, n, knn = 48, 3, 16, 12, 5
    v_dim = 40 if value_proj else hidden  # non-power-of-two v_dim
    cfg = MemoryLayersConfig.from_dict(dict(layers=[0], mode="parallel", n_keys=n, heads=heads, knn=knn,
                                            k_dim=k_dim, v_dim=v_dim, swilu=swilu), hidden, 2)
    x = torch.randn(7, hidden, generator=g)
    qw, qb = torch.randn(heads * k_dim, hidden, generator=g), torch.randn(heads * k_dim, generator=g)
    keys = torch.randn(heads, 2, n, k_dim // 2, generator=g)
    values = torch.randn(n * n, v_dim, generator=g).to(dtype)
    vp = torch.randn(hidden, v_dim, generator=g) if value_proj else None
    sp = torch.randn(v_dim, hidden, generator=g) if swilu else None
    layer = MemoryLayer(cfg, qw, qb, keys, TensorValueStore(values), vp, sp)
    got = layer(x)
    ref = reference(x, qw, qb, keys, values, vp, sp, heads, k_dim, knn)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_bad_config_names_the_field():
    with pytest.raises(UnsupportedModelError, match="mode"):
        MemoryLayersConfig.from_dict(dict(layers=[0], mode="x", n_keys=4, heads=1, knn=2, k_dim=4), 8, 2)
    with pytest.raises(UnsupportedModelError, match="layers"):
        MemoryLayersConfig.from_dict(dict(layers=[5], mode="replace", n_keys=4, heads=1, knn=2, k_dim=4), 8, 2)
