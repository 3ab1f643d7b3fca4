"""Weights prepared for generation: the same parameters as per-layer ``[in, out]`` matrices.

Decoding streams every weight once per token, so generation on CPU and GPU runs its layers unrolled
over per-layer matrices instead of scanning the stacked ``[L, ...]`` parameters (a scan makes
XLA:CPU copy each layer's weights out of the stack every step). :func:`prepare_weights` builds them
once: q/k/v and gate/up concatenated when ``fuse`` (one matmul each instead of three and two),
every matrix optionally cut into column chunks (separate matmuls XLA:CPU can run concurrently), and
the output projection as a ``[D, V]`` matrix (also for tied embeddings: XLA:CPU's matrix-vector
product is faster in that layout). ``decoder.layer`` applies either form; :func:`matmul` is the
product it uses for prepared matrices, with an optional native kernel for few-row products.
Weights stay in their parameter dtype and are cast to the compute dtype inside the matmuls.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.models.config import ModelConfig


def chunks(w, n: int):
    """An [in, out] matrix as ``n`` column chunks (or itself for n == 1)."""
    if n <= 1 or w.shape[1] < 2 * n:
        return w
    bounds = np.linspace(0, w.shape[1], n + 1).astype(int)
    return [w[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def prepare_layer(cfg: ModelConfig, fuse: bool, split: int, p: dict) -> dict:
    """One layer's parameters as ``[in, out]`` matrices: q/k/v and gate/up concatenated when ``fuse``,
    each matrix cut into ``split`` column chunks."""
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = p["wq"].reshape(D, H * Dh), p["wk"].reshape(D, K * Dh), p["wv"].reshape(D, K * Dh)
    out = {"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"]}
    if fuse:
        out["qkv"] = chunks(jnp.concatenate([q, k, v], 1), split)
        out["gu"] = chunks(jnp.concatenate([p["w_gate"], p["w_up"]], 1), split)
    else:
        out.update(q=chunks(q, split), k=chunks(k, split), v=chunks(v, split),
                   gate=chunks(p["w_gate"], split), up=chunks(p["w_up"], split))
    out["o"] = chunks(p["wo"].reshape(H * Dh, D), split)
    out["down"] = chunks(p["w_down"], split)
    return out


def prepare_weights(params: dict, cfg: ModelConfig, fuse: bool, split: int = 1, head_chunks: int = 1) -> dict:
    """The model's parameters with per-layer prepared matrices (``layers``: a list) and the output
    projection as ``head`` ``[D, V]`` (chunked by ``max(split, head_chunks)``). Layers are prepared one
    at a time inside a jit, so peak memory is the stacked plus the prepared weights."""
    prep = jax.jit(lambda stacked, i: prepare_layer(cfg, fuse, split, jax.tree.map(lambda a: a[i], stacked)))
    layers = [prep(params["layers"], jnp.int32(i)) for i in range(cfg.n_layers)]
    out = {k: v for k, v in params.items() if k not in ("layers", "lm_head")}
    out["layers"] = layers
    hsplit = max(split, int(head_chunks))
    if cfg.tie_embeddings:
        out["head"] = jax.jit(lambda e: chunks(e.T, hsplit))(params["embed"])
    else:
        out["head"] = jax.jit(lambda w: chunks(w, hsplit))(params["lm_head"])
    return out


def matmul(x, w, out_dtype=None, skinny: Callable | None = None):
    """``x [..., in] @ w`` for a prepared weight: an ``[in, out]`` matrix or a list of column chunks.
    ``skinny(x, w)`` is tried first when given (a native kernel that returns None for products it
    does not take)."""
    if isinstance(w, (list, tuple)):
        return jnp.concatenate([matmul(x, c, out_dtype, skinny) for c in w], axis=-1)
    y = None if skinny is None else skinny(x, w)
    if y is not None:
        return y
    return jnp.einsum("...i,io->...o", x, w.astype(x.dtype), preferred_element_type=out_dtype)
