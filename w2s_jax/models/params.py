"""Parameter trees of the decoder: logical axis names, shapes, random initialisation, the KV cache.

The names, shapes and axes come from the NNX model in ``llama.py`` (its abstract form under
``nnx.eval_shape``); this module gives them as the plain trees the functional code uses.

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
from w2s_jax.models.llama import init_values, layout_tree
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, tree_shardings

# ----------------------------------------------------------------------------- parameters


def param_axes(cfg: ModelConfig) -> dict:
    """Tree of logical axis names of the parameters (the ``out_sharding`` metadata of the NNX model)."""
    return layout_tree(cfg, lambda leaf: leaf.axes)


def param_shapes(cfg: ModelConfig) -> dict:
    """Tree of ``jax.ShapeDtypeStruct`` for the parameters (the abstract NNX model's shapes)."""
    return layout_tree(cfg, lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(leaf.dtype)))


def _init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    return init_values(cfg, key)


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
