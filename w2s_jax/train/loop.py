"""The training drivers: :func:`run_sft`, :func:`run_dpo` and the loop they share.

The loop feeds the compiled step (``build.py``) batch after batch, logs metrics, evaluates, writes
checkpoints and finally the model directory.

Faults: a NaN or infinite loss raises :class:`TrainingDiverged` naming the step, before any
checkpoint of that step is written (losses are checked one step behind the device, and always
before a save), so the last good checkpoint stays intact. A run restarted with the same output
directory resumes from the newest valid checkpoint (``io/orbax.py``) and the data position stored
with it, and produces the same losses as an uninterrupted run.

Multi-host (``distributed.py``): every process builds the same global batch from the seeded batcher and
feeds only its own rows (:func:`distributed.process_local_batch`); results come to the host with
:func:`distributed.to_host`. Only process 0 writes ``metrics.jsonl``, TensorBoard logs, ``compile.json``
and the reference cache; Orbax checkpoints are written by all processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from w2s_jax.core.errors import UserError
from w2s_jax.core.programs import ProgramCache
from w2s_jax.io.hf import params_to_hf
from w2s_jax.io.modeldir import check_output_dir
from w2s_jax.io.native import META_FILE, save_model
from w2s_jax.io.orbax import Checkpointer
from w2s_jax.io.peft import lora_to_peft
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import LoRAConfig, init_lora, merge_lora
from w2s_jax.parallel import distributed
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules
from w2s_jax.train import losses as L
from w2s_jax.train.batching import (
    TEMPLATES,
    DataPosition,
    PreferenceBatcher,
    SFTBatcher,
    split_eval,
    tokenize_pairs,
    tokenize_sft,
)
from w2s_jax.train.build import StepBundle, batch_shardings, build_steps, compile_steps, init_state, single_mesh
from w2s_jax.train.config import TrainConfig
from w2s_jax.train.metrics_log import MetricsLogger
from w2s_jax.train.reference import params_fingerprint, precompute_reference

__all__ = ["TrainingDiverged", "TrainModel", "TrainResult", "run_sft", "run_dpo", "run_training"]

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainModel:
    """What the drivers train: parameters, config, tokenizer and optionally an existing adapter.
    ``io.modeldir.LoadedModel`` has the same attributes."""

    params: Any
    cfg: ModelConfig
    tokenizer: Any = None
    lora: Any = None
    lora_cfg: LoRAConfig | None = None


@dataclass
class TrainResult:
    params: Any  # final base parameters (trained ones for full fine-tuning)
    lora: Any  # final adapters (None for full fine-tuning)
    lora_cfg: LoRAConfig | None
    step: int
    history: list[dict]  # per-step metrics of this process, {"step", "loss", ...}
    eval_history: list[dict]
    model_dir: Path | None
    resumed_from: int | None
    compile_info: dict
    n_truncated: int = 0  # sequences cut to seq_len (train.truncate=true)
    n_dropped: int = 0  # of those, examples with no completion token left (not trained on)


def _start_model(model, cfg: TrainConfig):
    """The base parameters training starts from: an adapter the model already has is merged into
    them (a LoRA run then trains a fresh adapter on top; the reference is the merged model)."""
    params = model.params
    if getattr(model, "lora", None) is not None:
        lcfg = model.lora_cfg
        if lcfg is None:
            raise UserError("model has a LoRA adapter but no LoRA config")
        params = jax.jit(partial(merge_lora, cfg=model.cfg, scale=lcfg.scale))(params, model.lora)
    return params


def run_sft(model, records: Sequence[dict], cfg: TrainConfig, out_dir: str | os.PathLike, *, mesh=None,
            rules: Rules = DEFAULT_RULES, eval_records: Sequence[dict] | None = None, export_hf: bool = False,
            checkpoint_dir: str | None = None, on_step: Callable | None = None,
            programs: ProgramCache | None = None) -> TrainResult:
    """Supervised fine-tuning on ``{id, prompt, completion}`` records. See :func:`run_training`."""
    return run_training("sft", model, records, cfg, out_dir, mesh=mesh, rules=rules, eval_records=eval_records,
                        export_hf=export_hf, checkpoint_dir=checkpoint_dir, on_step=on_step, programs=programs)


def run_dpo(model, records: Sequence[dict], cfg: TrainConfig, out_dir: str | os.PathLike, *, mesh=None,
            rules: Rules = DEFAULT_RULES, eval_records: Sequence[dict] | None = None, export_hf: bool = False,
            ref_cache: str | os.PathLike | None = None, checkpoint_dir: str | None = None,
            on_step: Callable | None = None, programs: ProgramCache | None = None) -> TrainResult:
    """Preference optimisation (``cfg.loss_type``) on ``{id, prompt, chosen, rejected}`` records.
    ``ref_cache``: JSONL file for the precomputed reference log-probs (default
    ``<out_dir>/ref_logps.jsonl``). See :func:`run_training`."""
    return run_training("dpo", model, records, cfg, out_dir, mesh=mesh, rules=rules, eval_records=eval_records,
                        export_hf=export_hf, ref_cache=ref_cache, checkpoint_dir=checkpoint_dir, on_step=on_step,
                        programs=programs)


def _finite_or_raise(step: int, metrics: dict, ckpt_dir: str, last_saved: int | None) -> dict:
    host = {k: float(v) for k, v in distributed.to_host(metrics).items()}
    if not math.isfinite(host["loss"]):
        where = f"step {last_saved} in {ckpt_dir}" if last_saved is not None else "none saved yet"
        raise TrainingDiverged(
            f"training diverged: loss is {host['loss']} at step {step} (grad norm {host.get('grad_norm')}); "
            f"stopped without saving; last good checkpoint: {where}. Lower train.lr or check the data."
        )
    return host


@dataclass
class _Data:
    """Tokenised training and evaluation items with their batchers and the length of training."""

    items: list
    stats: Any  # batching.TokenizeStats
    batcher: Any
    eval_batcher: Any
    total: int  # optimizer steps
    epochs: int | None  # None: stop after `total` steps


def _tokenize(kind: str, records, eval_records, tok, cfg: TrainConfig):
    """``(items, eval_items or None, stats)``; over-long sequences raise or are truncated and counted."""
    enc = TEMPLATES[cfg.template]
    tokenize = tokenize_sft if kind == "sft" else tokenize_pairs
    items, stats = tokenize(records, tok, cfg.seq_len, cfg.truncate, enc)
    ev_items = tokenize(eval_records, tok, cfg.seq_len, cfg.truncate, enc)[0] if eval_records else None
    if stats.n_truncated:
        log.warning("%d sequences truncated to seq_len=%d (%d examples dropped: nothing left to learn)",
                    stats.n_truncated, cfg.seq_len, stats.n_dropped)
    if not items:
        raise UserError("no training examples")
    if ev_items is None:
        items, ev_items = split_eval(items, cfg.eval_fraction, cfg.seed)
    return items, ev_items, stats


def _make_batcher(kind: str, xs, cfg: TrainConfig, train: bool):
    kw = dict(grad_accum=cfg.grad_accum if train else 1, seed=cfg.seed, shuffle=train, drop_last=train,
              bucket_lengths=cfg.bucket_lengths)
    if kind == "sft":
        return SFTBatcher(xs, cfg.batch_size, cfg.seq_len, packing=cfg.packing, **kw)
    return PreferenceBatcher(xs, cfg.batch_size, cfg.seq_len, **kw)


def _prepare_data(kind: str, model, base, records, eval_records, cfg: TrainConfig, out: Path, mesh, rules,
                  ref_cache) -> _Data:
    """Tokenise, add reference log-probs where the loss needs them, and plan the batches."""
    mcfg: ModelConfig = model.cfg
    tok = model.tokenizer
    items, ev_items, stats = _tokenize(kind, records, eval_records, tok, cfg)
    if kind == "dpo" and cfg.loss_type not in L.REFERENCE_FREE and cfg.reference == "precompute":
        have = all(("ref_chosen" in r and "ref_rejected" in r) for r in records)
        if not have:
            fp = params_fingerprint(base, mcfg, {"seq_len": cfg.seq_len, "tok": getattr(tok, "spec", repr(tok)),
                                                "template": cfg.template})
            cache = ref_cache if ref_cache is not None else out / "ref_logps.jsonl"
            both = precompute_reference(base, mcfg, items + list(ev_items or []), cfg, mesh, rules, cache, fp)
            items, ev_items = both[: len(items)], both[len(items):]
    batcher = _make_batcher(kind, items, cfg, True)
    eval_batcher = _make_batcher(kind, ev_items, cfg, False) if ev_items else None
    if cfg.max_steps is not None:
        total, epochs = int(cfg.max_steps), None
    else:
        total, epochs = sum(batcher.num_batches(e) for e in range(cfg.epochs)), cfg.epochs
    if total < 1:
        raise UserError("no training steps: fewer examples than one batch (lower train.batch_size)")
    return _Data(items, stats, batcher, eval_batcher, total, epochs)


def _eval_result(kind: str, sums: dict) -> dict:
    """Exact means over the evaluation set from the summed metrics of its batches."""
    if kind == "sft":
        return {"loss": sums["loss_sum"] / max(sums["count"], 1.0), "tokens": sums["count"]}
    n = max(sums.pop("count"), 1.0)
    nll_tok = sums.pop("nll_tokens", None)
    res = {k: v / n for k, v in sums.items()}
    if nll_tok is not None:
        res["nll_loss"] = sums["nll_loss"] / max(nll_tok, 1.0)
        res["loss"] = res["loss"] + res["nll_loss"]
    return res


class _Loop:
    """One run's mutable training state: the device state, the checkpointer, the metric logs."""

    def __init__(self, kind: str, cfg: TrainConfig, out: Path, data: _Data, bundle: StepBundle, frozen,
                 ckpt_dir: str, on_step: Callable | None):
        self.kind, self.cfg, self.out, self.data, self.bundle, self.frozen = kind, cfg, out, data, bundle, frozen
        self.mesh, self.rules = bundle.spec.mesh, bundle.spec.rules
        self.ckpt_dir, self.on_step = ckpt_dir, on_step
        self.ckpt = Checkpointer(ckpt_dir, keep=cfg.keep, async_save=cfg.async_checkpointing)
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.window: list[dict] = []
        self.state = None
        self.resumed_from: int | None = None
        self.last_saved: int | None = None

    def start(self, trainable0) -> None:
        """Restore the newest valid checkpoint, or start from ``trainable0``."""
        restored = self.ckpt.restore_latest(self.bundle.abstract_state)
        if restored is not None:
            self.state, self.resumed_from = restored.state, restored.step
            log.info("resuming from checkpoint step %d", self.resumed_from)
        else:
            self.state = init_state(self.bundle, trainable0, self.cfg.seed)
        self.last_saved = self.resumed_from

    def _local(self, batch: dict) -> dict:
        # the same global batch on every process; each feeds only its own rows
        return distributed.process_local_batch(batch, batch_shardings(batch, self.mesh, self.rules))

    def run_eval(self, at_step: int, logger: MetricsLogger) -> None:
        eb = self.data.eval_batcher
        if eb is None or (self.eval_history and self.eval_history[-1]["step"] == at_step):
            return
        sums: dict = {}
        for T, rows in eb.plan(0):
            r = distributed.to_host(self.bundle.eval_fn(self.state.params, self._local(eb.build(T, rows)), self.frozen))
            for k, v in r.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        res = {"step": at_step, **_eval_result(self.kind, sums)}
        self.eval_history.append(res)
        logger.log(at_step, {k: v for k, v in res.items() if k != "step"}, split="eval")

    def save(self, at_step: int, at_pos: DataPosition) -> None:
        rep = self.bundle.state_sh.step
        self.state = self.state.replace(data_pos=jax.device_put(np.array([at_pos.epoch, at_pos.index], np.int32), rep))
        self.ckpt.save(at_step, self.state, {"data_pos": [at_pos.epoch, at_pos.index], "kind": self.kind,
                                             "config": json.loads(json.dumps(asdict(self.cfg), default=str))})
        self.last_saved = at_step

    def check(self, step: int, metrics) -> None:
        """Bring a step's metrics to the host, raise if the loss is not finite, record them."""
        host = _finite_or_raise(step, metrics, self.ckpt_dir, self.last_saved)
        host["step"] = step
        self.history.append(host)
        self.window.append(host)
        if self.on_step is not None:
            self.on_step(step, host)

    def log_window(self, step: int, seconds: float, logger: MetricsLogger, bar) -> None:
        """Log the means of the steps since the last log line, with the learning rate and speed."""
        window = self.window
        agg = {k: float(np.mean([w[k] for w in window])) for k in window[0] if k != "step"}
        agg["lr"] = float(self.bundle.schedule(step - 1)) if self.bundle.schedule is not None else 0.0
        agg["steps_per_sec"] = len(window) / max(seconds, 1e-9)
        if "tokens" in agg:
            agg["tokens_per_sec"] = agg["tokens"] * agg["steps_per_sec"]
        logger.log(step, agg)
        bar.set_postfix(loss=f"{agg['loss']:.4f}")
        window.clear()

    def train(self, logger: MetricsLogger, bar) -> int:
        """Run the steps from the state's step to the end of training; returns the final step."""
        cfg, total = self.cfg, self.data.total
        step = int(distributed.to_host(self.state.step))
        epoch, index = (int(x) for x in distributed.to_host(self.state.data_pos))
        start_pos = pos = DataPosition(epoch, index)
        pending = None  # (step, device metrics) not yet checked
        t_window = time.perf_counter()
        if step < total:
            for pos, batch in self.data.batcher.batches(start=start_pos, epochs=self.data.epochs):
                self.state, metrics = self.bundle.compiled[batch["tokens"].shape[-1]](
                    self.state, self._local(batch), self.frozen)
                step += 1
                if pending is not None:
                    self.check(*pending)
                pending = (step, metrics)
                due_log = cfg.log_every > 0 and step % cfg.log_every == 0
                due_save = cfg.save_every > 0 and step % cfg.save_every == 0
                due_eval = cfg.eval_every > 0 and step % cfg.eval_every == 0
                last = step >= total
                if due_log or due_save or due_eval or last:
                    self.check(*pending)
                    pending = None
                if due_log or last:
                    self.log_window(step, time.perf_counter() - t_window, logger, bar)
                    t_window = time.perf_counter()
                bar.update(1)
                if due_save or last:
                    self.save(step, pos)
                if due_eval:
                    self.run_eval(step, logger)
                if last:
                    break
        if pending is not None:
            self.check(*pending)
        if self.last_saved != step:
            self.save(step, pos)
        self.run_eval(step, logger)
        return step


def _check_outputs(out: Path, export_hf: bool) -> None:
    """Model directories are replaced only when w2s-jax wrote them: refuse now, not after training."""
    check_output_dir(out / "model", (META_FILE,))
    for sub in ("hf", "peft", "hf_base") if export_hf else ():
        check_output_dir(out / sub)


def _initial_trainable(model, base, bundle: StepBundle, cfg: TrainConfig):
    """``(frozen, trainable)``: LoRA trains fresh adapters on frozen (placed) base weights; full
    fine-tuning trains the base weights themselves."""
    if cfg.lora is not None:
        frozen = jax.device_put(base, bundle.frozen_sh)
        return frozen, init_lora(model.cfg, cfg.lora, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1))
    return None, base


def run_training(kind: str, model, records, cfg: TrainConfig, out_dir, *, mesh=None, rules: Rules = DEFAULT_RULES,
                 eval_records=None, export_hf: bool = False, ref_cache=None, checkpoint_dir: str | None = None,
                 on_step: Callable | None = None, programs: ProgramCache | None = None) -> TrainResult:
    """Train and save. ``model``: a :class:`TrainModel` or ``io.modeldir.LoadedModel``.

    Writes under ``out_dir``: ``checkpoints/`` (or ``checkpoint_dir``, may be ``gs://``),
    ``metrics.jsonl``, ``tensorboard/``, ``compile.json`` and the final model in ``model/`` (plus
    ``hf/`` when ``export_hf``). With full fine-tuning the parameter buffers passed in are donated
    to the training state (do not use them afterwards; the result holds the trained ones).
    ``on_step(step, host_metrics)`` is called after each step's loss is checked (tests use it to
    interrupt a run). ``programs``: a cache of compiled steps to share with other runs of this
    process (default: a new one). Multi-host: every process calls this with the same arguments; only
    process 0 writes files other than checkpoints, and all return once the model directory is complete.
    """
    if kind not in ("sft", "dpo"):
        raise ValueError(kind)
    out = Path(out_dir)
    _check_outputs(out, export_hf)
    out.mkdir(parents=True, exist_ok=True)  # (on every process: checkpoints may go under it)
    main = distributed.is_main_process()
    mesh = mesh if mesh is not None else single_mesh()
    mcfg: ModelConfig = model.cfg
    if model.tokenizer is None:
        raise UserError("training needs the model's tokenizer")
    if cfg.seq_len > mcfg.max_seq_len:
        log.warning("train.seq_len=%d exceeds the model's max_seq_len=%d", cfg.seq_len, mcfg.max_seq_len)
    base = _start_model(model, cfg)
    data = _prepare_data(kind, model, base, records, eval_records, cfg, out, mesh, rules, ref_cache)

    bundle = build_steps(kind, mcfg, cfg, data.total, mesh, rules, programs=programs)
    frozen, trainable0 = _initial_trainable(model, base, bundle, cfg)
    del base
    loop = _Loop(kind, cfg, out, data, bundle, frozen, checkpoint_dir or str(out / "checkpoints"), on_step)
    loop.start(trainable0)
    del trainable0
    step0 = int(distributed.to_host(loop.state.step))
    compile_info = compile_steps(bundle, kind, cfg, data.batcher.shapes(), data.total)
    if main:
        (out / "compile.json").write_text(json.dumps({str(k): v for k, v in compile_info.items()}, indent=1))

    resume_step = step0 if loop.resumed_from is not None else 0
    logger = MetricsLogger(out, tensorboard=cfg.tensorboard, resume_step=resume_step)
    bar = tqdm(total=data.total, initial=step0, disable=not (cfg.progress and main), desc=kind, dynamic_ncols=True)
    try:
        step = loop.train(logger, bar)
    finally:
        bar.close()
        loop.ckpt.close()
        logger.close()

    params_out, lora_out = (frozen, loop.state.params) if cfg.lora is not None else (loop.state.params, None)
    model_dir = _write_model(out, model, params_out, lora_out, cfg.lora, export_hf)
    return TrainResult(params_out, lora_out, cfg.lora, step, loop.history, loop.eval_history, model_dir,
                       loop.resumed_from, compile_info, data.stats.n_truncated, data.stats.n_dropped)


def _write_model(out: Path, model, params, lora, lora_cfg: LoRAConfig | None, export_hf: bool) -> Path:
    """The final model in ``<out>/model`` (and the Hugging Face export); every process returns once
    it is complete."""
    model_dir = out / "model"
    save_model(model_dir, params, model.cfg, model.tokenizer, lora=lora, lora_cfg=lora_cfg)
    if export_hf:
        hf_source = getattr(model, "source", None) if getattr(model, "format", "") == "hf" else None
        _export_hf(out, params, lora, lora_cfg, model.cfg, model.tokenizer,
                   base_changed=getattr(model, "lora", None) is not None, source=hf_source)
    distributed.sync("train: model written")  # other processes may load the model process 0 wrote
    return model_dir


def _export_hf(out: Path, params, lora, lora_cfg, mcfg, tok, base_changed: bool, source) -> None:
    """Full fine-tuning: a Hugging Face dir ``<out>/hf``. LoRA: a PEFT adapter dir ``<out>/peft``
    whose base is the loaded Hugging Face checkpoint, or ``<out>/hf_base`` (written here) when the
    model did not come from a Hugging Face dir or an earlier adapter was merged into it."""
    if lora is None:
        params_to_hf(out / "hf", params, mcfg, tok)
        return
    base_ref = source
    if base_changed or not source:
        params_to_hf(out / "hf_base", params, mcfg, tok)
        base_ref = str((out / "hf_base").resolve())
    lora_to_peft(out / "peft", lora, lora_cfg, mcfg, base_model_name_or_path=base_ref, tokenizer=tok)
