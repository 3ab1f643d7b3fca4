"""Tokenised, fixed-shape training batches with a deterministic, resumable order.

SFT records ``{id, prompt, completion}`` and preference records ``{id, prompt, chosen, rejected}``
are tokenised with ``tokenizer.encode_example`` (``[bos] + prompt + " " + completion + [eos]``).

Every batch has the same array shapes ``[grad_accum, rows, seq_len]`` (optionally one of a few
configured bucket lengths instead of ``seq_len``), so the step compiles once per shape:

- ``tokens``      int32   input ids (0 in padding)
- ``targets``     int32   the next token of the same example (0 where there is none)
- ``loss_mask``   float32 1 where the target is a completion token (prompt tokens carry no loss)
- ``segment_ids`` int32   1, 2, ... per example in a row; 0 = padding (attention never crosses)
- ``positions``   int32   restart at 0 for every example

SFT rows are *packed* (several examples per row, first-fit over the shuffled order) or *padded*
(one example per row; with ``bucket_lengths`` each batch takes the smallest bucket that fits, and
examples of similar length are batched together within windows of the shuffled order). Preference
batches hold one sequence per row: the ``B`` chosen sequences first, then the ``B`` rejected ones
(``2B`` rows, one forward pass), plus ``nll_mask`` (every real target, for ORPO's NLL),
``ref_logps [2B]`` (precomputed reference log-probs or zeros) and ``pair_mask [B]``.

The order of an epoch is a pure function of ``(seed, epoch)``; the data position
``(epoch, index)`` -- index = batches of that epoch already consumed -- is all a resumed run needs.
A sequence longer than ``seq_len`` is an error naming its id, or is truncated (and counted) when
``truncate=True`` (``core.lengths.truncate_example``, cut from the right: the first ``seq_len`` tokens stay).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.core.lengths import pick_bucket, truncate_example
from w2s_jax.io.tokenizer import encode_example, encode_prompt

SFT_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
PREF_KEYS = (*SFT_KEYS, "nll_mask", "ref_logps", "pair_mask")


@dataclass(frozen=True)
class Example:
    id: str
    ids: np.ndarray  # int32 [L]
    n_prompt: int  # tokens [0, n_prompt) are prompt (bos included)


@dataclass(frozen=True)
class PairExample:
    id: str
    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


@dataclass
class TokenizeStats:
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0  # truncated so far that no completion token was left


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    index: int = 0  # batches of `epoch` already consumed


def encode_vanilla(tok, prompt: str, completion: str) -> tuple[list[int], int]:
    """LLaMA-Factory's ``vanilla`` template (the paper's training): ``[bos] + encode(prompt)`` and
    ``encode(completion) + [eos]`` tokenized *separately* and concatenated, so nothing merges across
    the boundary and the prompt ids are exactly what generation conditions on. No joining space is
    inserted: a sentencepiece tokenizer (Llama 2) adds its own word-start marker to the completion,
    a byte-level BPE (Llama 3) does not -- as in the release."""
    p_ids = encode_prompt(tok, prompt)
    return p_ids + list(tok.encode(completion)) + [tok.eos_id], len(p_ids)


def _fit(rid, ids, n_prompt, seq_len, truncate, stats, what="") -> Example | None:
    if len(ids) > seq_len:
        if not truncate:
            raise UserError(
                f"record `{rid}`{what}: {len(ids)} tokens exceed seq_len={seq_len} "
                "(raise train.seq_len or set train.truncate=true)"
            )
        stats.n_truncated += 1
        ids, n_prompt = truncate_example(ids, n_prompt, seq_len, side="right")
        if n_prompt >= seq_len:  # no completion token left to learn from
            stats.n_dropped += 1
            return None
    return Example(str(rid), np.asarray(ids, np.int32), int(n_prompt))


TEMPLATES = {"joined": encode_example, "vanilla": encode_vanilla}


def tokenize_sft(
    records: Sequence[dict], tok, seq_len: int, truncate: bool = False, encode=None
) -> tuple[list[Example], TokenizeStats]:
    """Tokenise ``{id, prompt, completion}`` records; over-long ones raise or are truncated."""
    encode = encode or encode_example
    stats = TokenizeStats()
    out = []
    for i, r in enumerate(records):
        for k in ("prompt", "completion"):
            if k not in r:
                raise UserError(f"SFT record {r.get('id', i)!r} is missing `{k}`")
        rid = r.get("id", i)
        ids, n_prompt = encode(tok, r["prompt"], r["completion"])
        ex = _fit(rid, ids, n_prompt, seq_len, truncate, stats)
        if ex is not None:
            out.append(ex)
    stats.n_examples = len(out)
    return out, stats


def tokenize_pairs(
    records: Sequence[dict], tok, seq_len: int, truncate: bool = False, encode=None
) -> tuple[list[PairExample], TokenizeStats]:
    """Tokenise ``{id, prompt, chosen, rejected}`` records (optional ``ref_chosen``/``ref_rejected``)."""
    encode = encode or encode_example
    stats = TokenizeStats()
    out = []
    for i, r in enumerate(records):
        for k in ("prompt", "chosen", "rejected"):
            if k not in r:
                raise UserError(f"preference record {r.get('id', i)!r} is missing `{k}`")
        rid = r.get("id", i)
        c = _fit(rid, *encode(tok, r["prompt"], r["chosen"]), seq_len, truncate, stats, " (chosen)")
        j = _fit(rid, *encode(tok, r["prompt"], r["rejected"]), seq_len, truncate, stats, " (rejected)")
        if c is None or j is None:
            continue
        out.append(PairExample(str(rid), c, j, float(r.get("ref_chosen", 0.0)), float(r.get("ref_rejected", 0.0))))
    stats.n_examples = len(out)
    return out, stats


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a deterministic held-out slice of ``round(fraction * n)`` items (at least one
    when ``fraction > 0`` and there are two or more items)."""
    n = len(items)
    if fraction <= 0 or n < 2:
        return list(items), []
    k = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    held = set(perm[:k].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ----------------------------------------------------------------------------- row filling


def _fill_row(out: dict, r: int, examples: Sequence[Example], nll: bool = False) -> None:
    """Write examples into row ``r`` of ``out`` (arrays [R, T]) one after another."""
    off = 0
    for seg, ex in enumerate(examples, start=1):
        L = len(ex.ids)
        sl = slice(off, off + L)
        out["tokens"][r, sl] = ex.ids
        out["segment_ids"][r, sl] = seg
        out["positions"][r, sl] = np.arange(L, dtype=np.int32)
        out["targets"][r, off : off + L - 1] = ex.ids[1:]
        # target at position i is ids[i+1]: a completion token when i + 1 >= n_prompt
        first = off + max(ex.n_prompt - 1, 0)
        out["loss_mask"][r, first : off + L - 1] = 1.0
        if nll:
            out["nll_mask"][r, off : off + L - 1] = 1.0
        off += L


def _empty(rows: int, T: int, keys) -> dict:
    out = {}
    for k in keys:
        dt = np.float32 if k in ("loss_mask", "nll_mask") else np.int32
        out[k] = np.zeros((rows, T), dt)
    return out


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), 0xBA7C])


def pack_first_fit(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Rows of item indices: each item (in the given order) goes into the first row it fits."""
    caps = np.zeros(0, np.int64)
    rows: list[list[int]] = []
    for i, L in enumerate(lengths):
        fits = np.flatnonzero(caps >= L)
        if len(fits):
            r = int(fits[0])
            caps[r] -= L
            rows[r].append(i)
        else:
            caps = np.append(caps, seq_len - L)
            rows.append([i])
    return rows


# ----------------------------------------------------------------------------- batchers


class _Batcher:
    """Shared plumbing: an epoch plan (list of batches, each ``grad_accum * rows`` rows of example
    indices and a length), resumable iteration and array building."""

    rows: int
    grad_accum: int
    seq_len: int

    def __init__(self, n_items, rows, seq_len, grad_accum=1, seed=0, shuffle=True, drop_last=True,
                 bucket_lengths=None):
        if rows < 1 or grad_accum < 1:
            raise UserError(f"batch_size ({rows}) and grad_accum ({grad_accum}) must be >= 1")
        self.n_items = n_items
        self.rows, self.seq_len, self.grad_accum = int(rows), int(seq_len), int(grad_accum)
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        bl = sorted({int(b) for b in (bucket_lengths or ())} | {self.seq_len})
        self.bucket_lengths = tuple(b for b in bl if b <= self.seq_len)
        self._plans: dict[int, list] = {}

    @property
    def rows_per_batch(self) -> int:
        return self.rows * self.grad_accum

    def shapes(self) -> list[int]:
        """The distinct row lengths batches may have (each compiles once)."""
        return list(self.bucket_lengths)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_items)
        return _rng(self.seed, epoch).permutation(self.n_items)

    def plan(self, epoch: int) -> list[tuple[int, list[list[int]]]]:
        if epoch not in self._plans:
            self._plans = {epoch: self._make_plan(epoch)}
        return self._plans[epoch]

    def num_batches(self, epoch: int = 0) -> int:
        return len(self.plan(epoch))

    def _group(self, rows: list[list[int]], lengths: list[int] | None = None):
        """Rows -> batches of rows_per_batch rows (last one padded with empty rows unless dropped)."""
        per = self.rows_per_batch
        out = []
        for s in range(0, len(rows), per):
            chunk = rows[s : s + per]
            if len(chunk) < per:
                if self.drop_last and out:
                    break
                chunk = chunk + [[] for _ in range(per - len(chunk))]
            T = self.seq_len if lengths is None else pick_bucket(max(lengths[s : s + per]), self.bucket_lengths)
            out.append((T, chunk))
        return out

    def batches(self, start: DataPosition = DataPosition(), epochs: int | None = None
                ) -> Iterator[tuple[DataPosition, dict]]:
        """Yield ``(position after this batch, batch)`` from ``start`` on, epoch after epoch."""
        epoch, index = start.epoch, start.index
        while epochs is None or epoch < epochs:
            plan = self.plan(epoch)
            if not plan:
                raise UserError("no training batches: the data set is empty")
            while index < len(plan):
                T, rows = plan[index]
                index += 1
                yield DataPosition(epoch, index), self.build(T, rows)
            epoch, index = epoch + 1, 0

    def all_batches(self) -> list[dict]:
        return [self.build(T, rows) for T, rows in self.plan(0)]


class SFTBatcher(_Batcher):
    def __init__(self, examples: Sequence[Example], rows: int, seq_len: int, *, packing: bool = True,
                 grad_accum: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 bucket_lengths: Sequence[int] | None = None):
        super().__init__(len(examples), rows, seq_len, grad_accum, seed, shuffle, drop_last,
                         None if packing else bucket_lengths)
        self.examples = list(examples)
        self.packing = packing
        for ex in self.examples:
            if len(ex.ids) > seq_len:
                raise UserError(f"record `{ex.id}`: {len(ex.ids)} tokens exceed seq_len={seq_len}")

    def _make_plan(self, epoch):
        order = self._order(epoch)
        lengths = [len(self.examples[i].ids) for i in order]
        if self.packing:
            rows = [[int(order[j]) for j in row] for row in pack_first_fit(lengths, self.seq_len)]
            if self.shuffle:
                rows = [rows[i] for i in _rng(self.seed, epoch).permutation(len(rows))]
            return self._group(rows)
        return _padded_plan(self, order, lengths, epoch)

    def build(self, T: int, rows: list[list[int]]) -> dict:
        out = _empty(len(rows), T, SFT_KEYS)
        for r, idx in enumerate(rows):
            _fill_row(out, r, [self.examples[i] for i in idx])
        A = self.grad_accum
        return {k: v.reshape(A, self.rows, T) for k, v in out.items()}

    def utilisation(self, epoch: int = 0) -> float:
        """Fraction of token slots holding real tokens (packing efficiency)."""
        plan = self.plan(epoch)
        used = sum(len(self.examples[i].ids) for _, rows in plan for row in rows for i in row)
        total = sum(T * len(rows) for T, rows in plan)
        return used / max(total, 1)


def _padded_plan(b: _Batcher, order: np.ndarray, lengths: list[int], epoch: int):
    """One item per row. With buckets: sort by length inside windows of 32 batches of the shuffled
    order, then shuffle the batches (similar lengths together, order still random)."""
    per = b.rows_per_batch
    if len(b.bucket_lengths) == 1:
        return b._group([[int(i)] for i in order])
    window = per * 32
    items = []
    for s in range(0, len(order), window):
        w = sorted(range(s, min(s + window, len(order))), key=lambda j: lengths[j])
        items.extend(w)
    plan = b._group([[int(order[j])] for j in items], [lengths[j] for j in items])
    if b.shuffle:
        plan = [plan[i] for i in _rng(b.seed, epoch + 1_000_003).permutation(len(plan))]
    return plan


class PreferenceBatcher(_Batcher):
    """Batches of ``rows`` pairs per micro-batch: ``2 * rows`` sequences (chosen, then rejected)."""

    def __init__(self, pairs: Sequence[PairExample], rows: int, seq_len: int, *, grad_accum: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 bucket_lengths: Sequence[int] | None = None):
        super().__init__(len(pairs), rows, seq_len, grad_accum, seed, shuffle, drop_last, bucket_lengths)
        self.pairs = list(pairs)

    def _make_plan(self, epoch):
        order = self._order(epoch)
        lengths = [max(len(self.pairs[i].chosen.ids), len(self.pairs[i].rejected.ids)) for i in order]
        return _padded_plan(self, order, lengths, epoch)

    def build(self, T: int, rows: list[list[int]]) -> dict:
        A, B = self.grad_accum, self.rows
        out = {k: [] for k in PREF_KEYS}
        for a in range(A):
            micro = rows[a * B : (a + 1) * B]
            arr = _empty(2 * B, T, ("tokens", "targets", "loss_mask", "segment_ids", "positions", "nll_mask"))
            ref = np.zeros((2 * B,), np.float32)
            pm = np.zeros((B,), np.float32)
            for r, idx in enumerate(micro):
                if not idx:
                    continue
                p = self.pairs[idx[0]]
                _fill_row(arr, r, [p.chosen], nll=True)
                _fill_row(arr, B + r, [p.rejected], nll=True)
                ref[r], ref[B + r] = p.ref_chosen, p.ref_rejected
                pm[r] = 1.0
            for k, v in arr.items():
                out[k].append(v)
            out["ref_logps"].append(ref)
            out["pair_mask"].append(pm)
        return {k: np.stack(v) for k, v in out.items()}


def steps_per_epoch(batcher: _Batcher) -> int:
    return batcher.num_batches(0)


def total_steps(batcher: _Batcher, epochs: float) -> int:
    return int(math.ceil(batcher.num_batches(0) * epochs))
