"""Reference log-probabilities for DPO/IPO/hinge: a scoring pass with the start weights, cached as JSONL.

The cache rows are ``{key, id, ref_chosen, ref_rejected, fingerprint}``, keyed by each pair's content
(:func:`pair_key`) and valid for one fingerprint of the start weights and tokenisation
(:func:`params_fingerprint`). Every process takes the same branch (the scoring pass is one SPMD
program); only process 0 writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import jax
import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import read_jsonl, write_jsonl_atomic
from w2s_jax.io.orbax import tree_checksums
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.params import param_axes, param_shapes
from w2s_jax.parallel import distributed
from w2s_jax.parallel.sharding import DEFAULT_RULES, tree_shardings
from w2s_jax.train import build
from w2s_jax.train.batching import PreferenceBatcher
from w2s_jax.train.build import batch_shardings
from w2s_jax.train.config import TrainConfig
from w2s_jax.train.steps import StepSpec, reference_logps

__all__ = ["pair_key", "params_fingerprint", "precompute_reference"]

log = logging.getLogger(__name__)


def params_fingerprint(params, model_cfg: ModelConfig, extra: dict) -> str:
    """A hash of the model config, the parameters' checksums and ``extra`` (what else the cache depends on)."""
    blob = json.dumps({"cfg": asdict(model_cfg), "sums": tree_checksums(params), **extra}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pair_key(p) -> str:
    """The content key of a tokenised pair: a hash of its chosen and rejected token ids and prompt
    lengths. Record ids are not unique across pairs (MATH and OlympicArena give up to three pairs per
    question, all with the question's id), so the reference cache is keyed by content."""
    h = hashlib.sha256()
    for ex in (p.chosen, p.rejected):
        h.update(np.asarray(ex.ids, np.int32).tobytes())
        h.update(b"|%d;" % int(ex.n_prompt))
    return h.hexdigest()[:24]


def precompute_reference(params, model_cfg: ModelConfig, pairs, cfg: TrainConfig, mesh, rules=DEFAULT_RULES,
                         cache_path: str | os.PathLike | None = None, fingerprint: str = "") -> list:
    """Reference log-probs of every pair (a scoring pass with the start weights), cached as JSONL
    ``{key, id, ref_chosen, ref_rejected, fingerprint}`` keyed by the pair's content
    (:func:`pair_key`); a cache with another fingerprint (or without keys) is recomputed."""
    if not pairs:
        return []
    keys = [pair_key(p) for p in pairs]
    table = None
    if cache_path is not None and Path(cache_path).is_file():
        try:
            rows = read_jsonl(cache_path, required=("key", "ref_chosen", "ref_rejected", "fingerprint"))
            table = {str(r["key"]): r for r in rows if r["fingerprint"] == fingerprint}
            if not all(k in table for k in keys):
                table = None
        except UserError as e:
            log.warning("ignoring unreadable reference cache %s: %s", cache_path, e)
    # every process must take the same branch (the scoring pass is one SPMD program)
    if distributed.all_true(table is not None):
        log.info("reference log-probs from cache %s", cache_path)
        return [replace(p, ref_chosen=float(table[k]["ref_chosen"]), ref_rejected=float(table[k]["ref_rejected"]))
                for p, k in zip(pairs, keys)]
    spec = StepSpec(model_cfg, "dpo", mesh=mesh, rules=rules, logits_chunks=cfg.logits_chunks)
    batcher = PreferenceBatcher(pairs, cfg.batch_size, cfg.seq_len, grad_accum=1, shuffle=False, drop_last=False,
                                bucket_lengths=cfg.bucket_lengths)
    p_sh = tree_shardings(mesh, param_axes(model_cfg), param_shapes(model_cfg), rules)
    params = jax.device_put(params, p_sh)
    fn = jax.jit(partial(reference_logps, spec=spec), compiler_options=dict(build.COMPILER_OPTIONS) or None)
    out: dict[int, tuple[float, float]] = {}  # pair index -> (chosen, rejected)
    t0 = time.perf_counter()
    for T, rows in batcher.plan(0):
        b = batcher.build(T, rows)
        b = distributed.process_local_batch(b, batch_shardings(b, mesh, rules))
        lp = distributed.to_host(fn(params, b))[0]
        B = len(rows)
        for r, idx in enumerate(rows):
            if idx:
                out[idx[0]] = (float(lp[r]), float(lp[B + r]))
    if len(out) != len(pairs):  # never expected: every pair is in exactly one row of the plan
        raise RuntimeError(f"reference pass scored {len(out)} of {len(pairs)} pairs")
    log.info("reference log-probs of %d pairs in %.1fs", len(out), time.perf_counter() - t0)
    if cache_path is not None and distributed.is_main_process():
        rows_out, seen = [], set()
        for i, (p, k) in enumerate(zip(pairs, keys)):
            if k not in seen:
                seen.add(k)
                rows_out.append({"key": k, "id": p.id, "ref_chosen": out[i][0], "ref_rejected": out[i][1],
                                 "fingerprint": fingerprint})
        write_jsonl_atomic(cache_path, rows_out)
    return [replace(p, ref_chosen=out[i][0], ref_rejected=out[i][1]) for i, p in enumerate(pairs)]
