"""Pieces shared by the generation programs (static batches and the continuous engine): the weight
form of their layers, the output projection, and token sampling.

Sampling: greedy (``temperature == 0``) is ``argmax``; otherwise ``logits / temperature``, optionally
restricted to the ``top_k`` largest (ties at the k-th value kept) and to the nucleus ``top_p`` (found
by an exact bisection on the probability threshold rather than a full sort), then Gumbel-max with
the row's key folded with the token index.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from w2s_jax.infer import kernels as native
from w2s_jax.models import decoder as D
from w2s_jax.models import prepare

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3  # finish codes


def skinny_for(spec) -> Callable | None:
    """The native matrix-vector kernel for the products of a program with ``spec.cpu_kernels`` (float32,
    at most ``kernels.SKINNY_MAX_ROWS`` rows: the decode steps), else None (XLA's dot)."""
    if not spec.cpu_kernels:
        return None

    def skinny(x, w):
        if x.dtype == jnp.float32 and w.dtype == jnp.float32 and math.prod(x.shape[:-1]) <= native.SKINNY_MAX_ROWS:
            return native.skinny_matmul(x, w)
        return None

    return skinny


def attention_kernel_for(spec) -> Callable | None:
    """The native decode-attention kernel for a program with ``spec.cpu_kernels`` (a float32 cache; it
    reads only each row's live slots), else None (XLA's masked attention over the whole cache)."""
    if not spec.cpu_kernels:
        return None

    def kernel(q, ck, cv, lo, hi):
        if q.dtype == ck.dtype == cv.dtype == jnp.float32:
            return native.decode_attention(q, ck, cv, lo, hi)
        return None

    return kernel


def layer_proj(spec, lora_scale, skinny: Callable | None = None) -> D.Proj:
    """The weight form of a generation program's layers (no LoRA dropout)."""
    return D.Proj(lora_scale, flat=spec.platform == "cpu", skinny=skinny)


def head_logits(cfg, weights, h, skinny: Callable | None = None):
    """Float32 logits [B, V] for final hidden states h [B, D] (already normalized)."""
    if "head" in weights:  # prepared [D, V] output projection (see prepare.py)
        return prepare.matmul(h, weights["head"], jnp.float32, skinny)
    if cfg.tie_embeddings:
        return jnp.einsum("bd,vd->bv", h, weights["embed"].astype(h.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("bd,dv->bv", h, weights["lm_head"].astype(h.dtype), preferred_element_type=jnp.float32)


def top_p_mask(logits, top_p):
    """Keep the tokens whose probability is >= t*, the largest threshold whose kept mass reaches top_p
    (exact bisection over the float bit patterns; no sort)."""
    probs = jax.nn.softmax(logits, axis=-1)
    pmax = jnp.max(probs, axis=-1)
    lo = jnp.zeros(probs.shape[:1], jnp.int32)
    hi = jax.lax.bitcast_convert_type(pmax, jnp.int32) + 1

    def body(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        t = jax.lax.bitcast_convert_type(mid, jnp.float32)
        mass = jnp.sum(jnp.where(probs >= t[:, None], probs, 0.0), axis=-1)
        ok = mass >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    t = jax.lax.bitcast_convert_type(lo, jnp.float32)
    return probs >= t[:, None]


def argmax(x):
    """First index of the maximum along the last axis (as ``jnp.argmax``, NaN aside): two plain
    reductions, which XLA:CPU vectorizes, instead of argmax's variadic (value, index) reduction
    (~3x slower over a 49k vocabulary)."""
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1).astype(jnp.int32)


def sample(spec, logits, keys, step, temperature, top_p):
    """One token per row; every row at token index ``step``."""
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), logits.shape[:1])
    return sample_rows(spec, logits, keys, steps, temperature, top_p)


def sample_rows(spec, logits, keys, steps, temperature, top_p):
    """One token per row: greedy, or a Gumbel-max draw from row ``i``'s key folded with its token index
    ``steps[i]`` (so a row's draw never depends on which slot or batch it sits in)."""
    if spec.greedy:
        return argmax(logits)
    logits = logits / temperature
    neg = jnp.float32(-jnp.inf)
    if spec.top_k:
        kth = jax.lax.top_k(logits, spec.top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, neg)
    if spec.use_top_p:
        logits = jnp.where(top_p_mask(logits, top_p), logits, neg)
    V = logits.shape[-1]
    g = jax.vmap(lambda k, t: jax.random.gumbel(jax.random.fold_in(k, t), (V,), jnp.float32))(keys, steps)
    return argmax(logits + g)
