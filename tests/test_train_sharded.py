"""On 8 simulated CPU devices, (data, fsdp, tensor) meshes (8,1,1), (2,2,2) and (1,2,4) give the same
losses and updated parameters as one device, for the SFT step (full fine-tuning, gradient
accumulation) and the DPO step (LoRA, reference with the adapters off).

Tolerance: losses and metrics rtol 1e-5 (observed <= 2e-7); parameters after two AdamW steps
atol 5e-6 + rtol 1e-4 (observed <= 1e-6). Sharded reductions add in another order, and Adam's early
updates are ~lr*sign(g), which amplifies rounding where |g| ~ eps: with lr=1e-3, 5e-6 is 0.5% of
one update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.io.tokenizer import ByteTokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import LoRAConfig, lora_shapes
from w2s_jax.models.params import param_shapes
from w2s_jax.parallel.sharding import make_mesh
from w2s_jax.train import build as TB
from w2s_jax.train import config as TC
from w2s_jax.train.batching import PreferenceBatcher, SFTBatcher, tokenize_pairs, tokenize_sft

TOK = ByteTokenizer()
# vocab 264 and 64-wide MLP divide the mesh axes; kv_heads=2 does not divide tensor=4 (dropped)
CFG = ModelConfig("t", vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


@pytest.fixture(autouse=True)
def fast_compile(monkeypatch):
    monkeypatch.setattr(TB, "COMPILER_OPTIONS", {"xla_backend_optimization_level": 0})


def _rand(shapes, seed, zero=()):
    rng = np.random.default_rng(seed)

    def f(path, s):
        k = jax.tree_util.keystr(path)
        if "norm" in k:
            return np.ones(s.shape, np.float32)
        if any(z in k for z in zero):
            return np.zeros(s.shape, np.float32)
        return rng.normal(0, 0.05, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(f, shapes)


def _mesh(shape):
    d, f, t = shape
    return make_mesh({"data": d, "fsdp": f, "tensor": t})


def _run(kind, cfg, batch, mesh, trainable, frozen=None, steps=2):
    bundle = TB.build_steps(kind, CFG, cfg, steps, mesh)
    state = TB.init_state(bundle, jax.tree.map(jnp.asarray, trainable), seed=0)
    fr = None if frozen is None else jax.device_put(jax.tree.map(jnp.asarray, frozen), bundle.frozen_sh)
    hist = []
    for _ in range(steps):
        state, m = bundle.step_fn(state, batch, fr)
        hist.append({k: float(v) for k, v in m.items()})
    shard_specs = {tuple(x.sharding.spec) for x in jax.tree.leaves(state.params)}
    return hist, jax.tree.map(np.asarray, jax.device_get(state.params)), shard_specs


def _compare(ref, got):
    (h0, p0, _), (h1, p1, specs) = ref, got
    for a, b in zip(h0, h1):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=5e-6)
    return specs


def test_sft_step_same_on_all_meshes():
    ex, _ = tokenize_sft([{"id": i, "prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(16)], TOK, 32)
    cfg = TC.TrainConfig(lr=1e-3, batch_size=8, grad_accum=2, seq_len=32, packing=False, weight_decay=0.1)
    batch = SFTBatcher(ex, 8, 32, packing=False, grad_accum=2, shuffle=False).all_batches()[0]
    params = _rand(param_shapes(CFG), 0)
    ref = _run("sft", cfg, batch, make_mesh({"data": 1}, jax.devices()[:1]), params)
    assert ref[0][1]["loss"] < ref[0][0]["loss"]
    for shape in MESHES:
        specs = _compare(ref, _run("sft", cfg, batch, _mesh(shape), params))
        sharded = any(any(p is not None for p in spec) for spec in specs)
        assert sharded == (shape != (8, 1, 1)), (shape, specs)  # fsdp/tensor really shard the weights


def test_dpo_lora_step_same_on_all_meshes():
    recs = [{"id": i, "prompt": f"{i}*2=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(8)]
    pairs, _ = tokenize_pairs(recs, TOK, 32)
    lcfg = LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "up", "down"))
    cfg = TC.TrainConfig(lr=1e-3, batch_size=8, seq_len=32, lora=lcfg, reference="lora_off", beta=0.5)
    batch = PreferenceBatcher(pairs, 8, 32, shuffle=False).all_batches()[0]
    params = _rand(param_shapes(CFG), 1)
    lora = _rand(lora_shapes(CFG, lcfg), 2, zero=("'b'",))
    ref = _run("dpo", cfg, batch, make_mesh({"data": 1}, jax.devices()[:1]), lora, params)
    assert ref[0][0]["loss"] == pytest.approx(np.log(2), rel=1e-6)
    assert ref[0][1]["rewards/margins"] > 0
    for shape in MESHES:
        _compare(ref, _run("dpo", cfg, batch, _mesh(shape), lora, params))
