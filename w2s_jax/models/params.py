"""Parameter trees of the decoder: logical axis names, shapes, random initialisation, the KV cache.

Weight layout (x @ W, per layer; stacked over L):

    embed      [V, D]            ("vocab", "embed")
    attn_norm  [L, D]            ("layers", "norm")
    wq         [L, D, H, Dh]     ("layers", "embed", "heads", "head_dim")
    wk, wv     [L, D, K, Dh]     ("layers", "embed", "kv_heads", "head_dim")
    wo         [L, H, Dh, D]     ("layers", "heads", "head_dim", "embed")
    mlp_norm   [L, D]
    w_gate,w_up[L, D, F]         ("layers", "embed", "mlp")
    w_down     [L, F, D]         ("layers", "mlp", "embed")
    final_norm [D]
    lm_head    [D, V]            (absent when embeddings are tied)
"""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp

from w2s_jax.models.config import ModelConfig
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, tree_shardings

# ----------------------------------------------------------------------------- parameters


def param_axes(cfg: ModelConfig) -> dict:
    axes = {
        "embed": ("vocab", "embed"),
        "layers": {
            "attn_norm": ("layers", "norm"),
            "wq": ("layers", "embed", "heads", "head_dim"),
            "wk": ("layers", "embed", "kv_heads", "head_dim"),
            "wv": ("layers", "embed", "kv_heads", "head_dim"),
            "wo": ("layers", "heads", "head_dim", "embed"),
            "mlp_norm": ("layers", "norm"),
            "w_gate": ("layers", "embed", "mlp"),
            "w_up": ("layers", "embed", "mlp"),
            "w_down": ("layers", "mlp", "embed"),
        },
        "final_norm": ("norm",),
    }
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> dict:
    """Tree of ``jax.ShapeDtypeStruct`` for the parameters."""
    D, F, L, V = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dt = jnp.dtype(cfg.param_dtype)
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dt)
    shapes = {
        "embed": s(V, D),
        "layers": {
            "attn_norm": s(L, D),
            "wq": s(L, D, H, Dh),
            "wk": s(L, D, K, Dh),
            "wv": s(L, D, K, Dh),
            "wo": s(L, H, Dh, D),
            "mlp_norm": s(L, D),
            "w_gate": s(L, D, F),
            "w_up": s(L, D, F),
            "w_down": s(L, F, D),
        },
        "final_norm": s(D),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = s(D, V)
    return shapes


def _init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    norm_value = 0.0 if cfg.norm_plus_one else 1.0
    for (path, sds), k in zip(leaves, keys):
        name = path[-1].key
        if "norm" in name:
            out.append(jnp.full(sds.shape, norm_value, sds.dtype))
        else:
            out.append((cfg.initializer_range * jax.random.normal(k, sds.shape, jnp.float32)).astype(sds.dtype))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


def param_shardings(cfg: ModelConfig, mesh, rules: Rules = DEFAULT_RULES):
    return tree_shardings(mesh, param_axes(cfg), param_shapes(cfg), rules)


@functools.lru_cache(maxsize=16)
def _init_fn(cfg: ModelConfig, mesh, rules: Rules):
    if mesh is None:
        return jax.jit(partial(_init_params, cfg))
    return jax.jit(partial(_init_params, cfg), out_shardings=param_shardings(cfg, mesh, rules))


def init_params(cfg: ModelConfig, key: jax.Array, mesh=None, rules: Rules = DEFAULT_RULES) -> dict:
    """Random parameters, created directly sharded on ``mesh`` (jit with out_shardings; compiled once
    per (config, mesh, rules))."""
    return _init_fn(cfg, mesh, rules)(key)
