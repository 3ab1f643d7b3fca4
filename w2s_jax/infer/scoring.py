"""Summed completion log-probabilities: ``w2s logprobs`` and the DPO reference-model pass.

Library API (used by the trainer):

- :func:`token_logprobs` ``(params, cfg, tokens, segment_ids=None, positions=None, lora=None,
  lora_scale=1.0, mesh=None, rules=DEFAULT_RULES) -> [B, T] float32``: ``out[b, t]`` is
  ``log p(tokens[b, t] | tokens[b, :t])`` (0 at ``t = 0``). Jitted (``cfg``/``mesh``/``rules`` static).
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
  and padded to a few bucket lengths (powers of two from 16 to 1024, then multiples of 1024) and
  always ``batch_size`` rows, so a data set compiles only a handful of programs.

Too long: a sequence longer than ``max_length`` (default and upper bound: the model's
``max_seq_len``) is a UserError naming the record, unless ``truncate`` is set: then the prompt is cut
from the left (its BOS kept), then, if still needed, the completion from the right; the number of
truncated sequences is returned in ``stats["truncated"]`` and printed by the CLI.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.io.tokenizer import encode_example
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.decoder import forward
from w2s_jax.parallel.distributed import to_host
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, named_sharding

__all__ = ["token_logprobs", "completion_logprobs", "score_records", "bucket_length", "main"]


def _token_logprobs_impl(params, tokens, segment_ids, positions, lora, lora_scale, cfg, mesh, rules):
    logits, _ = forward(
        params, tokens, cfg, positions=positions, segment_ids=segment_ids, lora=lora, lora_scale=lora_scale,
        mesh=mesh, rules=rules,
    )
    logits = logits.astype(jnp.float32)
    nxt = jnp.roll(tokens, -1, axis=1)  # target of position t is token t+1
    picked = jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0]
    lp = picked - jax.nn.logsumexp(logits, axis=-1)  # [B, T]: log p(tokens[t+1] | <= t)
    return jnp.pad(lp[:, :-1], ((0, 0), (1, 0)))


_STATIC = ("cfg", "mesh", "rules")


@partial(jax.jit, static_argnames=_STATIC)
def _token_logprobs_jit(params, tokens, segment_ids, positions, lora, lora_scale, cfg, mesh, rules):
    return _token_logprobs_impl(params, tokens, segment_ids, positions, lora, lora_scale, cfg, mesh, rules)


@partial(jax.jit, static_argnames=_STATIC)
def _completion_logprobs_jit(params, tokens, loss_mask, segment_ids, positions, lora, lora_scale, cfg, mesh, rules):
    lp = _token_logprobs_impl(params, tokens, segment_ids, positions, lora, lora_scale, cfg, mesh, rules)
    m = (loss_mask > 0) & (segment_ids > 0)
    return jnp.sum(jnp.where(m, lp, 0.0), axis=1), jnp.sum(m, axis=1).astype(jnp.int32)


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
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    return _token_logprobs_jit(
        params, tokens, jnp.asarray(segment_ids, jnp.int32), positions, lora, jnp.float32(lora_scale),
        cfg=cfg, mesh=mesh, rules=rules,
    )


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
    ``loss_mask`` [B, T] is set (and ``segment_ids`` > 0). Jitted; see the module docstring."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    return _completion_logprobs_jit(
        params, tokens, jnp.asarray(loss_mask, jnp.int32), jnp.asarray(segment_ids, jnp.int32), positions, lora,
        jnp.float32(lora_scale), cfg=cfg, mesh=mesh, rules=rules,
    )


# ----------------------------------------------------------------------------- batched driver


def bucket_length(n: int) -> int:
    """Padded length for a batch whose longest sequence has ``n`` tokens."""
    if n <= 1024:
        b = 16
        while b < n:
            b *= 2
        return b
    return -(-n // 1024) * 1024


def _truncate(ids: list[int], n_prompt: int, max_len: int, keep_head: int) -> tuple[list[int], int]:
    """Cut the prompt from the left (keeping ``keep_head`` leading tokens, the BOS) and then the
    completion from the right until ``len(ids) <= max_len``; at least one context token stays."""
    head, body, comp = ids[:keep_head], ids[keep_head:n_prompt], ids[n_prompt:]
    excess = len(ids) - max_len
    min_body = 0 if head else 1
    drop = min(excess, max(0, len(body) - min_body))
    body = body[drop:]
    excess -= drop
    if excess > 0:
        comp = comp[: len(comp) - excess]
    return head + body + comp, len(head) + len(body)


_FIELDS = {
    "completion": ("logprob", "num_tokens"),
    "chosen": ("chosen_logprob", "chosen_tokens"),
    "rejected": ("rejected_logprob", "rejected_tokens"),
}


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
) -> tuple[list[dict], dict]:
    """Score every record (see the module docstring); returns ``(new_records, stats)`` with
    ``stats = {"sequences", "truncated", "programs"}``. ``model`` is a ``checkpoint_io.LoadedModel``
    (its LoRA adapters, if any, are applied unless ``use_lora=False``); ``tokenizer`` overrides
    ``model.tokenizer``. Input records are not modified."""
    from w2s_jax.io.native import tokenizer_of

    tok = tokenizer if tokenizer is not None else tokenizer_of(model)
    cfg: ModelConfig = model.cfg
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if max_length is None:
        max_length = cfg.max_seq_len
    if max_length > cfg.max_seq_len:
        raise UserError(f"--max-length {max_length} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    lora = model.lora if use_lora else None
    lora_scale = model.lora_cfg.scale if lora is not None else 1.0

    seqs = []  # (record index, field, ids, n_prompt)
    n_trunc = 0
    for i, r in enumerate(records):
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
            ids, n_prompt = encode_example(tok, r["prompt"], r[f])
            if max(ids) >= cfg.vocab_size:
                raise UserError(f"record {rid}: token id {max(ids)} >= the model's vocab size {cfg.vocab_size}")
            if len(ids) > max_length:
                if not truncate:
                    raise UserError(
                        f"record {rid}: the `{f}` sequence has {len(ids)} tokens, more than the maximum length "
                        f"{max_length}; use --truncate to cut it (prompt from the left) or raise --max-length"
                    )
                ids, n_prompt = _truncate(ids, n_prompt, max_length, 1 if tok.add_bos else 0)
                if n_prompt >= len(ids):
                    raise UserError(f"record {rid}: nothing of `{f}` is left after truncating to {max_length}")
                n_trunc += 1
            seqs.append((i, f, ids, n_prompt))

    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][2]))
    results: dict[tuple[int, str], tuple[float, int]] = {}
    programs: set[tuple[int, int]] = set()
    pad = tok.pad_id if tok.pad_id is not None and 0 <= tok.pad_id < cfg.vocab_size else 0
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(seqs), desc="logprobs", unit="seq", file=sys.stderr)
    for batch in batches:
        T = bucket_length(max(len(seqs[k][2]) for k in batch))
        tokens = np.full((batch_size, T), pad, np.int32)
        seg = np.zeros((batch_size, T), np.int32)
        mask = np.zeros((batch_size, T), np.int32)
        for row, k in enumerate(batch):
            _, _, ids, n_prompt = seqs[k]
            tokens[row, : len(ids)] = ids
            seg[row, : len(ids)] = 1
            mask[row, n_prompt : len(ids)] = 1
        programs.add((batch_size, T))
        args = [tokens, mask, seg]
        if mesh is not None:
            sh = named_sharding(mesh, ("batch", "length"), (batch_size, T), rules)
            args = [jax.device_put(a, sh) for a in args]
        lp, cnt = completion_logprobs(
            model.params, cfg, args[0], args[1], segment_ids=args[2], lora=lora, lora_scale=lora_scale,
            mesh=mesh, rules=rules,
        )
        lp, cnt = to_host((lp, cnt))  # (a collective when the mesh spans processes: every host calls it)
        for row, k in enumerate(batch):
            i, f, _, _ = seqs[k]
            results[(i, f)] = (float(lp[row]), int(cnt[row]))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()

    out = []
    for i, r in enumerate(records):
        new = dict(r)
        for f, (lp_key, n_key) in _FIELDS.items():
            if (i, f) in results:
                new[lp_key], new[n_key] = results[(i, f)]
        out.append(new)
    return out, {"sequences": len(seqs), "truncated": n_trunc, "programs": sorted(programs)}


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None, prog: str = "w2s logprobs", command: str = "logprobs") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Add summed completion log-probabilities (and token counts) to JSONL records with "
        "prompt+completion or prompt+chosen+rejected.",
    )
    ap.add_argument("--model", required=True, help="native dir, Hugging Face dir, .gguf file or PEFT adapter dir")
    ap.add_argument("--input", required=True, help="input .jsonl")
    ap.add_argument("--output", required=True, help="output .jsonl (written atomically)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=None, help="default: the model's max_seq_len")
    ap.add_argument("--truncate", action="store_true", help="truncate over-long sequences instead of failing")
    ap.add_argument("--base", default=None, help="base model of a PEFT adapter directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path/spec overriding the model's ('byte')")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    ap.add_argument("--no-lora", action="store_true", help="ignore the model's LoRA adapters")
    ap.add_argument("--mesh", default=None, help="device mesh, e.g. data=-1,fsdp=1,tensor=1 (default: one device)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from w2s_jax.core.jsonl import read_jsonl, write_jsonl_atomic
    from w2s_jax.core.paths import check_output_file, check_output_not_input
    from w2s_jax.io.native import load_model

    check_output_file(args.output)
    check_output_not_input({"--output": args.output}, {"--input": args.input})
    records = read_jsonl(args.input, required=("prompt",))
    from w2s_jax.parallel.sharding import parse_mesh_arg

    mesh = parse_mesh_arg(args.mesh)
    model = load_model(args.model, mesh=mesh, dtype=args.dtype, base=args.base, tokenizer=args.tokenizer)
    out, stats = score_records(
        model, records, batch_size=args.batch_size, max_length=args.max_length, truncate=args.truncate, mesh=mesh,
        use_lora=not args.no_lora, progress=not args.no_progress,
    )
    write_jsonl_atomic(args.output, out)
    if stats["truncated"]:
        print(f"truncated {stats['truncated']} of {stats['sequences']} sequences to fit the maximum length")
    print(f"scored {stats['sequences']} sequences from {len(records)} records -> {args.output}")
    return 0
