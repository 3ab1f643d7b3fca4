"""Sequence lengths: the one truncation function and the bucket ladders.

Compiled programs are specialised to shapes, so batches are padded to a few *bucket* sizes instead
of their exact lengths: each bucket compiles once. :func:`doubling_buckets` gives the usual ladder
(``start``, twice that, ... then the maximum), :func:`pick_bucket` the smallest bucket that fits,
and :func:`bucket_length` an open-ended ladder for lengths with no fixed maximum.

:func:`truncate_example` fits ``(ids, n_prompt)`` -- a prompt followed by a completion -- into a
maximum length, cutting from one of two sides:

- ``"right"``: keep the first ``max_len`` tokens (LLaMA-Factory's ``cutoff_len``; training). The
  completion goes first; a prompt that fills the whole length leaves no completion token.
- ``"left"``: drop prompt tokens from the left, keeping the first ``keep_head`` (the BOS), and then,
  if still too long, completion tokens from the right; at least one context token stays (scoring,
  and generation, where the whole sequence is prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from w2s_jax.core.errors import UserError

__all__ = ["round_up", "doubling_buckets", "pick_bucket", "bucket_length", "truncate_example"]


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def doubling_buckets(top: int, start: int = 16) -> tuple[int, ...]:
    """``start``, ``2*start``, ``4*start``, ... below ``top``, then ``top`` itself."""
    out, b = [], start
    while b < top:
        out.append(b)
        b *= 2
    out.append(top)
    return tuple(out)


def pick_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``n``; a UserError when ``n`` exceeds them all."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise UserError(f"{n} exceeds the largest bucket {max(buckets)}")


def bucket_length(n: int, start: int = 16, step: int = 1024) -> int:
    """Padded length for ``n`` tokens with no fixed maximum: powers of two from ``start`` up to
    ``step``, then multiples of ``step``."""
    if n <= step:
        return pick_bucket(n, doubling_buckets(step, start))
    return round_up(n, step)


def truncate_example(ids: Sequence[int], n_prompt: int, max_len: int, *, side: Literal["left", "right"] = "left",
                     keep_head: int = 0) -> tuple[list[int], int]:
    """``(ids, n_prompt)`` cut to at most ``max_len`` tokens (see the module docstring for ``side``)."""
    ids = list(ids)
    if len(ids) <= max_len:
        return ids, n_prompt
    if side == "right":
        return ids[:max_len], min(n_prompt, max_len)
    if side != "left":
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    head, body, comp = ids[:keep_head], ids[keep_head:n_prompt], ids[n_prompt:]
    excess = len(ids) - max_len
    min_body = 0 if head else 1
    drop = min(excess, max(0, len(body) - min_body))
    body = body[drop:]
    excess -= drop
    if excess > 0:
        comp = comp[: len(comp) - excess]
    return head + body + comp, len(head) + len(body)
