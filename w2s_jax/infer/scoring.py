"""Summed completion log-probabilities (``w2s logprobs``).

Library API:

- :func:`token_logprobs` ``(params, cfg, tokens, segment_ids=None, positions=None, lora=None,
  lora_scale=1.0, mesh=None, rules=DEFAULT_RULES) -> [B, T] float32``: ``out[b, t]`` is
  ``log p(tokens[b, t] | tokens[b, :t])`` (0 at ``t = 0``), from ``models.logprobs.next_token_logps``.
- :func:`completion_logprobs` ``(params, cfg, tokens, loss_mask, segment_ids=None, positions=None,
  lora=None, lora_scale=1.0, mesh=None, rules=DEFAULT_RULES) -> (logprob [B] float32, num_tokens
  [B] int32)``: the sum of ``token_logprobs`` over positions where ``loss_mask`` is set (a token
  counts when it is a completion token, i.e. ``loss_mask[b, t] = 1`` for ``t >= n_prompt`` of
  :func:`w2s_jax.io.tokenizer.encode_example`), and how many there are. ``segment_ids`` is 0 on padding
  (default: all ones); for packed rows pass distinct ids per example and restarted ``positions``.
- :func:`score_records` ``(model, records, batch_size=8, max_length=None, truncate=False, mesh=None,
  rules=DEFAULT_RULES, use_lora=True, progress=False) -> (records, stats)``: adds ``logprob`` and
  ``num_tokens`` to records with ``prompt`` + ``completion``, and ``chosen_logprob``,
  ``rejected_logprob``, ``chosen_tokens``, ``rejected_tokens`` to records with ``prompt`` +
  ``chosen`` + ``rejected``. Examples are built with :func:`~w2s_jax.io.tokenizer.encode_example`
  (``prompt + " " + completion + eos``; the eos is scored too). Sequences are sorted by length
  and padded to a few bucket lengths (``core.lengths.bucket_length``: powers of two from 16 to 1024,
  then multiples of 1024) and always ``batch_size`` rows, so a data set compiles only a handful of
  programs.
- :class:`Scorer`: the compiled programs for one model configuration and mesh, kept in its
  :class:`~w2s_jax.core.programs.ProgramCache`; the functions above make one per call, a caller
  scoring many batches keeps one. :func:`score_file` is ``w2s logprobs`` (JSONL in, JSONL out).

Too long: a sequence longer than ``max_length`` (default and upper bound: the model's
``max_seq_len``) is a UserError naming the record, unless ``truncate`` is set: then the prompt is cut
from the left (its BOS kept), then, if still needed, the completion from the right
(``core.lengths.truncate_example``); the number of
truncated sequences is returned in ``stats["truncated"]`` and printed by the CLI.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import read_jsonl, write_jsonl_atomic
from w2s_jax.core.lengths import bucket_length, truncate_example
from w2s_jax.core.paths import check_output_file, check_output_not_input
from w2s_jax.core.programs import ProgramCache
from w2s_jax.io.native import load_model, tokenizer_of
from w2s_jax.io.tokenizer import encode_example
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.decoder import forward
from w2s_jax.models.logprobs import next_token_logps
from w2s_jax.parallel.distributed import to_host
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, named_sharding

__all__ = ["Scorer", "token_logprobs", "completion_logprobs", "score_records", "score_file"]


def _token_logprobs_impl(params, tokens, segment_ids, positions, lora, lora_scale, cfg, mesh, rules):
    logits = forward(
        params, tokens, cfg, positions=positions, segment_ids=segment_ids, lora=lora, lora_scale=lora_scale,
        mesh=mesh, rules=rules,
    )
    return next_token_logps(logits, tokens)


def _completion_logprobs_impl(params, tokens, loss_mask, segment_ids, positions, lora, lora_scale, cfg, mesh, rules):
    lp = _token_logprobs_impl(params, tokens, segment_ids, positions, lora, lora_scale, cfg, mesh, rules)
    m = (loss_mask > 0) & (segment_ids > 0)
    return jnp.sum(jnp.where(m, lp, 0.0), axis=1), jnp.sum(m, axis=1).astype(jnp.int32)


_IMPLS = {"token": _token_logprobs_impl, "completion": _completion_logprobs_impl}


class Scorer:
    """The jitted scoring programs of one model configuration and mesh (``cfg``, ``mesh`` and
    ``rules`` are static), kept in ``programs``; each compiles once per input shape."""

    def __init__(self, cfg: ModelConfig, mesh=None, rules: Rules = DEFAULT_RULES,
                 programs: ProgramCache | None = None):
        self.cfg, self.mesh, self.rules = cfg, mesh, rules
        self.programs = programs if programs is not None else ProgramCache()

    def program(self, kind: str):
        """The jitted ``token`` or ``completion`` function (positional arguments as its impl)."""
        key = (kind, self.cfg, self.mesh, self.rules)
        return self.programs.get_or_make(
            key, lambda: jax.jit(partial(_IMPLS[kind], cfg=self.cfg, mesh=self.mesh, rules=self.rules)))

    def token_logprobs(self, params: dict, tokens, segment_ids=None, positions=None, lora: dict | None = None,
                       lora_scale: float = 1.0) -> jax.Array:
        """``[B, T]`` float32: ``log p(tokens[:, t] | tokens[:, :t])``, 0 at ``t = 0``."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        return self.program("token")(params, tokens, jnp.asarray(segment_ids, jnp.int32), positions, lora,
                                     jnp.float32(lora_scale))

    def completion_logprobs(self, params: dict, tokens, loss_mask, segment_ids=None, positions=None,
                            lora: dict | None = None, lora_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
        """``(logprob [B] float32, num_tokens [B] int32)`` over the positions where ``loss_mask`` is set
        (and ``segment_ids`` > 0)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        return self.program("completion")(
            params, tokens, jnp.asarray(loss_mask, jnp.int32), jnp.asarray(segment_ids, jnp.int32), positions, lora,
            jnp.float32(lora_scale))


def token_logprobs(
    params: dict,
    cfg: ModelConfig,
    tokens,
    segment_ids=None,
    positions=None,
    lora: dict | None = None,
    lora_scale: float = 1.0,
    mesh=None,
    rules: Rules = DEFAULT_RULES,
) -> jax.Array:
    """``[B, T]`` float32: ``log p(tokens[:, t] | tokens[:, :t])``, 0 at ``t = 0`` (see module doc)."""
    return Scorer(cfg, mesh, rules).token_logprobs(params, tokens, segment_ids, positions, lora, lora_scale)


def completion_logprobs(
    params: dict,
    cfg: ModelConfig,
    tokens,
    loss_mask,
    segment_ids=None,
    positions=None,
    lora: dict | None = None,
    lora_scale: float = 1.0,
    mesh=None,
    rules: Rules = DEFAULT_RULES,
) -> tuple[jax.Array, jax.Array]:
    """``(logprob [B] float32, num_tokens [B] int32)``: summed log-probs of the tokens where
    ``loss_mask`` [B, T] is set (and ``segment_ids`` > 0). See the module docstring."""
    return Scorer(cfg, mesh, rules).completion_logprobs(params, tokens, loss_mask, segment_ids, positions, lora,
                                                        lora_scale)


# ----------------------------------------------------------------------------- batched driver


_FIELDS = {
    "completion": ("logprob", "num_tokens"),
    "chosen": ("chosen_logprob", "chosen_tokens"),
    "rejected": ("rejected_logprob", "rejected_tokens"),
}


def _record_fields(i: int, r: dict) -> list[str]:
    """The fields of record ``i`` to score, after checking the record's shape."""
    rid = r.get("id", f"#{i + 1}")
    fields = []
    if "completion" in r:
        fields.append("completion")
    if "chosen" in r or "rejected" in r:
        if not ("chosen" in r and "rejected" in r):
            raise UserError(f"record {rid}: has only one of `chosen`/`rejected`")
        fields += ["chosen", "rejected"]
    if not fields:
        raise UserError(f"record {rid}: needs `completion`, or `chosen` and `rejected`")
    if not isinstance(r.get("prompt"), str):
        raise UserError(f"record {rid}: `prompt` must be a string")
    for f in fields:
        if not isinstance(r[f], str):
            raise UserError(f"record {rid}: `{f}` must be a string, got {type(r[f]).__name__}")
    return fields


def _encode_records(records: list[dict], tok, cfg: ModelConfig, max_length: int, truncate: bool):
    """``([(record index, field, ids, n_prompt)], number truncated)`` for every sequence to score."""
    seqs = []
    n_trunc = 0
    for i, r in enumerate(records):
        rid = r.get("id", f"#{i + 1}")
        for f in _record_fields(i, r):
            ids, n_prompt = encode_example(tok, r["prompt"], r[f])
            if max(ids) >= cfg.vocab_size:
                raise UserError(f"record {rid}: token id {max(ids)} >= the model's vocab size {cfg.vocab_size}")
            if len(ids) > max_length:
                if not truncate:
                    raise UserError(
                        f"record {rid}: the `{f}` sequence has {len(ids)} tokens, more than the maximum length "
                        f"{max_length}; use --truncate to cut it (prompt from the left) or raise --max-length"
                    )
                ids, n_prompt = truncate_example(ids, n_prompt, max_length, side="left",
                                                 keep_head=1 if tok.add_bos else 0)
                if n_prompt >= len(ids):
                    raise UserError(f"record {rid}: nothing of `{f}` is left after truncating to {max_length}")
                n_trunc += 1
            seqs.append((i, f, ids, n_prompt))
    return seqs, n_trunc


def _padded_batch(seqs: list, batch: list[int], batch_size: int, pad: int):
    """``(tokens, loss mask, segment ids)`` ``[batch_size, T]`` for the sequences ``batch`` indexes."""
    T = bucket_length(max(len(seqs[k][2]) for k in batch))
    tokens = np.full((batch_size, T), pad, np.int32)
    seg = np.zeros((batch_size, T), np.int32)
    mask = np.zeros((batch_size, T), np.int32)
    for row, k in enumerate(batch):
        _, _, ids, n_prompt = seqs[k]
        tokens[row, : len(ids)] = ids
        seg[row, : len(ids)] = 1
        mask[row, n_prompt : len(ids)] = 1
    return tokens, mask, seg


def _check_score_args(cfg: ModelConfig, batch_size: int, max_length: int | None) -> int:
    """The maximum length to use, after checking the batch size and length against the model."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if max_length is None:
        max_length = cfg.max_seq_len
    if max_length > cfg.max_seq_len:
        raise UserError(f"--max-length {max_length} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    return max_length


def score_records(
    model,
    records: list[dict],
    batch_size: int = 8,
    max_length: int | None = None,
    truncate: bool = False,
    mesh=None,
    rules: Rules = DEFAULT_RULES,
    use_lora: bool = True,
    progress: bool = False,
    tokenizer=None,
    scorer: Scorer | None = None,
) -> tuple[list[dict], dict]:
    """Score every record (see the module docstring); returns ``(new_records, stats)`` with
    ``stats = {"sequences", "truncated", "programs"}``. ``model`` is an ``io.modeldir.LoadedModel``
    (its LoRA adapters, if any, are applied unless ``use_lora=False``); ``tokenizer`` overrides
    ``model.tokenizer``; ``scorer`` keeps compiled programs across calls. Input records are not modified."""
    tok = tokenizer if tokenizer is not None else tokenizer_of(model)
    cfg: ModelConfig = model.cfg
    max_length = _check_score_args(cfg, batch_size, max_length)
    scorer = scorer if scorer is not None else Scorer(cfg, mesh, rules)
    lora = model.lora if use_lora else None
    lora_scale = model.lora_cfg.scale if lora is not None else 1.0
    seqs, n_trunc = _encode_records(records, tok, cfg, max_length, truncate)

    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][2]))
    results: dict[tuple[int, str], tuple[float, int]] = {}
    programs: set[tuple[int, int]] = set()
    pad = tok.pad_id if tok.pad_id is not None and 0 <= tok.pad_id < cfg.vocab_size else 0
    bar = tqdm(total=len(seqs), desc="logprobs", unit="seq", file=sys.stderr) if progress else None
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        args = _padded_batch(seqs, batch, batch_size, pad)
        programs.add(args[0].shape)
        if mesh is not None:
            sh = named_sharding(mesh, ("batch", "length"), args[0].shape, rules)
            args = [jax.device_put(a, sh) for a in args]
        lp, cnt = scorer.completion_logprobs(model.params, args[0], args[1], segment_ids=args[2], lora=lora,
                                             lora_scale=lora_scale)
        lp, cnt = to_host((lp, cnt))  # (a collective when the mesh spans processes: every host calls it)
        for row, k in enumerate(batch):
            i, f, _, _ = seqs[k]
            results[(i, f)] = (float(lp[row]), int(cnt[row]))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return _merge_results(records, results), {"sequences": len(seqs), "truncated": n_trunc,
                                              "programs": sorted(programs)}


def _merge_results(records: list[dict], results: dict) -> list[dict]:
    out = []
    for i, r in enumerate(records):
        new = dict(r)
        for f, (lp_key, n_key) in _FIELDS.items():
            if (i, f) in results:
                new[lp_key], new[n_key] = results[(i, f)]
        out.append(new)
    return out


def score_file(model_path: str | os.PathLike, input_path: str | os.PathLike, output_path: str | os.PathLike, *,
               mesh=None, dtype=None, base=None, tokenizer=None, **score_kw) -> tuple[int, dict]:
    """``w2s logprobs``: score the JSONL records of ``input_path`` with the model at ``model_path``
    and write them to ``output_path`` (atomically); returns ``(number of records, stats)``.
    ``score_kw`` go to :func:`score_records`."""
    check_output_file(output_path)
    check_output_not_input({"--output": output_path}, {"--input": input_path})
    records = read_jsonl(input_path, required=("prompt",))
    model = load_model(model_path, mesh=mesh, dtype=dtype, base=base, tokenizer=tokenizer)
    out, stats = score_records(model, records, mesh=mesh, **score_kw)
    write_jsonl_atomic(output_path, out)
    return len(records), stats
