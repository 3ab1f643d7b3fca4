"""Per-token log-probabilities from logits: the one kernel training and scoring share.

:func:`token_logps` is ``log softmax(logits)[target]`` per position in float32, written as a
select-and-reduce over the vocabulary rather than a gather: it fuses with the softmax pass and works
on a vocab-sharded logits array without gathering it. :func:`next_token_logps` applies it to a row's
own next tokens (position ``t`` scores token ``t + 1``) and shifts the result so that ``out[:, t]`` is
``log p(tokens[:, t] | tokens[:, :t])``, 0 at ``t = 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["token_logps", "next_token_logps"]


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, float32 ``[..., T]``."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    picked = jnp.sum(jnp.where(vocab == targets[..., None].astype(jnp.int32), logits, 0.0), axis=-1)
    return picked - lse


def next_token_logps(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``[B, T]`` float32: ``log p(tokens[:, t] | tokens[:, :t])`` from the logits of ``tokens``; 0 at ``t = 0``."""
    lp = token_logps(logits, jnp.roll(tokens, -1, axis=1))  # position t predicts token t + 1
    return jnp.pad(lp[:, :-1], ((0, 0), (1, 0)))
