"""Sharded equals unsharded on 8 simulated CPU devices, loading straight onto the mesh; every
logical axis name the model uses is in the rules table."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import w2s_jax.models.decoder as model_mod
from w2s_jax.infer.engine import CACHE_NAMES, PREFIX_NAMES
from w2s_jax.infer.scoring import score_records
from w2s_jax.io.native import load_model, save_model
from w2s_jax.io.tokenizer import ByteTokenizer
from w2s_jax.models.config import PRESETS, ModelConfig
from w2s_jax.models.decoder import forward
from w2s_jax.models.lora import LoRAConfig, lora_axes
from w2s_jax.models.params import param_axes, param_shapes
from w2s_jax.parallel.sharding import DEFAULT_RULES, make_mesh

CFG = ModelConfig("shard", 264, 64, 2, 8, 4, 8, 128, 128, rope_theta=10000.0)
MESHES = [None, (8, 1, 1), (2, 2, 2), (1, 2, 4)]

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")


def _random_params(cfg, seed=0):
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(
            (1.0 if "norm" in path[-1].key else 0.0) + 0.15 * rng.standard_normal(s.shape), s.dtype
        ),
        param_shapes(cfg),
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from w2s_jax.io.hf import params_to_hf

    root = tmp_path_factory.mktemp("sharding")
    params = _random_params(CFG)
    params_to_hf(root / "hf", params, CFG, ByteTokenizer())
    save_model(root / "native", params, CFG, ByteTokenizer())
    return root


def _mesh(shape):
    return None if shape is None else make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))


@needs8
def test_sharded_logits_equal_unsharded(model_dirs):
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 264, (8, 16)))
    ref = None
    for shape in MESHES:
        mesh = _mesh(shape)
        lm = load_model(model_dirs / ("native" if shape == (2, 2, 2) else "hf"), mesh=mesh)
        out = np.asarray(jax.jit(lambda p, t, m=mesh, c=lm.cfg: forward(p, t, c, mesh=m))(lm.params, tokens))
        if ref is None:
            ref = out
            continue
        assert np.abs(out - ref).max() <= 1e-5, shape
        data, fsdp, tensor = shape
        wq, w_up, embed = lm.params["layers"]["wq"], lm.params["layers"]["w_up"], lm.params["embed"]
        assert isinstance(wq.sharding, NamedSharding) and wq.sharding.mesh.shape["tensor"] == tensor
        assert wq.sharding.spec == jax.sharding.PartitionSpec(
            None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None, None
        )
        if tensor > 1 or fsdp > 1:  # really split: each device holds a fraction of the parameter
            shard = wq.addressable_shards[0].data.shape
            assert shard == (CFG.n_layers, CFG.d_model // fsdp, CFG.n_heads // tensor, CFG.head_dim)
            assert w_up.addressable_shards[0].data.shape[-1] == CFG.d_ff // tensor
            assert embed.addressable_shards[0].data.shape == (CFG.vocab_size // tensor, CFG.d_model // fsdp)
        else:
            assert all(p is None for p in wq.sharding.spec)  # (8,1,1): pure data parallel, replicated


@needs8
def test_sharded_save_and_scoring(model_dirs, tmp_path):
    mesh = _mesh((2, 2, 2))
    lm = load_model(model_dirs / "hf", mesh=mesh)
    save_model(tmp_path / "m", lm.params, lm.cfg, lm.tokenizer)  # gathers shard by shard
    back = load_model(tmp_path / "m")
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(lm.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    recs = [{"id": i, "prompt": "q" * (3 * i + 1), "completion": "a" * (i + 2)} for i in range(5)]
    sharded, _ = score_records(lm, recs, batch_size=4, mesh=mesh)
    plain, _ = score_records(back, recs, batch_size=4)
    for s, p in zip(sharded, plain):
        assert abs(s["logprob"] - p["logprob"]) <= 1e-4 and s["num_tokens"] == p["num_tokens"]


def _names(tree):
    out = set()
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple)):
        out.update(n for n in leaf if n is not None)
    return out


def test_every_logical_name_is_in_the_rules_table():
    table = {name for name, _ in DEFAULT_RULES}
    used = set()
    for cfg in PRESETS.values():
        used |= _names(param_axes(cfg))
        used |= _names(lora_axes(cfg, LoRAConfig()))
    used |= set(CACHE_NAMES) | set(PREFIX_NAMES)
    # activation names passed to constrain(...) in the model source
    src = Path(model_mod.__file__).read_text()
    acts = re.findall(r"constrain\(\s*\w+\s*,\s*\(([^)]*)\)", src)
    assert acts, "found no constrain() calls to check"
    for a in acts:
        used |= set(re.findall(r'"(\w+)"', a))
    missing = used - table
    assert not missing, f"logical axis names missing from DEFAULT_RULES: {sorted(missing)}"
    assert {"batch", "length", "embed", "heads", "kv_heads", "mlp", "vocab", "layers", "lora_rank"} <= used
