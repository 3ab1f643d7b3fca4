"""What a generation call asks for and what it returns: :class:`SampleConfig`, :class:`Completion`,
and the host-side handling of prompts (encoding, fitting into the context, bucket ladders, the
prompt hash that the sampling keys fold in) and of finished rows (text, finish reason)."""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.core.lengths import doubling_buckets, round_up, truncate_example
from w2s_jax.infer.sampling import EOS, LENGTH, STOP
from w2s_jax.infer.stops import cut_at_stop
from w2s_jax.io.tokenizer import encode_prompt

__all__ = ["SampleConfig", "Completion", "default_prompt_buckets", "default_batch_buckets", "prompt_hash",
           "encode_prompts", "prompt_limit", "fit_prompts", "completion"]

FINISH_NAMES = {EOS: "eos", STOP: "stop", LENGTH: "length"}


@dataclass(frozen=True)
class SampleConfig:
    """How to generate.

    ``temperature == 0`` is greedy (``top_k``/``top_p`` ignored); ``top_k == 0`` and ``top_p == 1``
    are off. ``n`` samples per prompt use seeds ``seed .. seed + n - 1``. ``stop``: strings that end a
    sample (default none; the method's prompt format passes ``prompts.STOP_STRINGS``; ignored without a
    tokenizer, since there is no text then). ``batch_size``: decode slots of the continuous engine (rows
    decoded at once), rows (prompt x sample) per program of the static one; buckets default to
    :func:`default_prompt_buckets` / :func:`default_batch_buckets` (``core.lengths.doubling_buckets``
    ladders); ``max_prompt_len`` defaults to ``max_seq_len - max_new_tokens``. A longer prompt is an
    error unless ``truncate_prompts`` (then its left part is dropped, keeping a leading BOS)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    batch_size: int = 16
    prompt_buckets: tuple[int, ...] | None = None
    batch_buckets: tuple[int, ...] | None = None
    max_prompt_len: int | None = None
    truncate_prompts: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0 and math.isfinite(self.temperature),
             f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (0 <= self.seed and self.seed + self.n <= 2**32, f"seed must be in [0, 2**32 - n), got {self.seed}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **kw) -> SampleConfig:
        return dataclasses.replace(self, **kw)


@dataclass
class Completion:
    """One generated sample (see the module docstring for the exact meaning of each field)."""

    text: str
    token_ids: list[int]
    num_tokens: int
    finish_reason: str
    seed: int


def default_prompt_buckets(max_prompt_len: int) -> tuple[int, ...]:
    """16, 32, 64, ... (powers of two) below ``max_prompt_len``, then ``max_prompt_len`` itself."""
    return doubling_buckets(max_prompt_len)


def default_batch_buckets(batch_size: int, multiple: int = 1) -> tuple[int, ...]:
    """``multiple`` x 1, 2, 4, ... below ``batch_size``, then ``batch_size`` rounded up to ``multiple``."""
    return doubling_buckets(round_up(batch_size, multiple), start=multiple)


def prompt_hash(ids: Sequence[int]) -> int:
    """crc32 of the prompt's token ids (int32, little-endian): folded into every sample's PRNG key."""
    return zlib.crc32(np.asarray(ids, np.int64).astype("<i4").tobytes())


def encode_prompts(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids of each prompt (text through ``tokenizer``; id sequences as given)."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise UserError("text prompts need a tokenizer")
            out.append(list(encode_prompt(tokenizer, p)))
        else:
            out.append([int(t) for t in p])
    return out


def prompt_limit(max_seq_len: int, sc: SampleConfig) -> int:
    """The longest prompt that leaves room for ``max_new_tokens`` (and respects ``max_prompt_len``)."""
    limit = max_seq_len - sc.max_new_tokens
    if sc.max_prompt_len is not None:
        limit = min(limit, sc.max_prompt_len)
    if limit < 1:
        raise UserError(f"max_new_tokens={sc.max_new_tokens} leaves no room for a prompt (max_seq_len={max_seq_len})")
    return limit


def fit_prompts(ids: list[list[int]], sc: SampleConfig, max_seq_len: int,
                bos: int | None) -> tuple[list[list[int]], int]:
    """``ids`` with every prompt within :func:`prompt_limit` (left-truncated, keeping a leading ``bos``,
    when ``sc.truncate_prompts``; an error otherwise), and how many were truncated."""
    limit = prompt_limit(max_seq_len, sc)
    out, truncated = [], 0
    for i, t in enumerate(ids):
        if not t:
            raise UserError(f"prompt {i} is empty (no tokens)")
        if len(t) > limit:
            if not sc.truncate_prompts:
                raise UserError(
                    f"prompt {i} has {len(t)} tokens, more than the {limit} that fit "
                    f"(max_seq_len {max_seq_len} - max_new_tokens {sc.max_new_tokens})"
                )
            keep = 1 if (bos is not None and t[0] == bos) else 0
            t = truncate_example(t, len(t), limit, side="left", keep_head=keep)[0]
            truncated += 1
        out.append(t)
    return out, truncated


def completion(tokenizer, gen: list[int], code: int, sc: SampleConfig, j: int) -> Completion:
    """Sample ``j`` of a prompt from its generated ids and finish code (text cut at the first stop string)."""
    reason = FINISH_NAMES.get(code, "length")
    text = ""
    if tokenizer is not None:
        body = gen[:-1] if reason == "eos" else gen
        text, found = cut_at_stop(tokenizer.decode(body), sc.stop)
        if found:
            reason = "stop"
        text = text.strip()
    return Completion(text, gen, len(gen), reason, sc.seed + j)
