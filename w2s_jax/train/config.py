"""Training configuration: optimizer, length of training, batches, evaluation, checkpoints, LoRA
and preference optimisation settings (``train:`` in a run config)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from w2s_jax.models.lora import LoRAConfig
from w2s_jax.train import losses as L

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    # optimizer (AdamW, decoupled weight decay, skipping norms and 1-D parameters)
    lr: float = 1e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # length of training: epochs, unless max_steps is set
    epochs: int = 1
    max_steps: int | None = None
    # batches: batch_size rows (SFT) or pairs (DPO) per micro-batch, grad_accum micro-batches/step
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    packing: bool = True  # SFT only; preference rows are padded
    bucket_lengths: tuple[int, ...] = ()  # padded rows: shorter shapes (each compiles once)
    truncate: bool = False  # over-long sequences: False = error naming the id, True = truncate+count
    # how an example is tokenized: `joined` = prompt + " " + completion as one text (default);
    # `vanilla` = LLaMA-Factory's template: prompt and completion tokenized separately, concatenated
    template: Literal["joined", "vanilla"] = "joined"
    # evaluation, logging, checkpoints
    eval_fraction: float = 0.0
    eval_every: int = 0  # 0 = only at the end
    log_every: int = 10
    save_every: int = 0  # 0 = only at the end
    keep: int = 2
    async_checkpointing: bool = True
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True
    # LoRA (None = full fine-tuning)
    lora: LoRAConfig | None = None
    # preference optimisation
    loss_type: Literal["sigmoid", "ipo", "hinge", "orpo", "orpo_llamafactory", "simpo"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: Literal["precompute", "lora_off"] = "precompute"
    # loss over vocab: split the rows into this many chunks whose logits are recomputed in the
    # backward pass (saves the [rows, T, V] logits residual; 1 = off)
    logits_chunks: int = 1

    def __post_init__(self):
        if self.loss_type not in L.PREFERENCE_LOSSES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; valid: {L.PREFERENCE_LOSSES}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if self.reference not in ("precompute", "lora_off"):
            raise ValueError(f"unknown reference mode {self.reference!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.seq_len < 2:
            raise ValueError("batch_size and grad_accum must be >= 1 and seq_len >= 2")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError("set epochs >= 1 or max_steps")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or null: train for `epochs`), got {self.max_steps}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
        for name, ok, want in (
            ("lr", finite(self.lr) and self.lr >= 0, "a finite number >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("warmup_ratio", finite(self.warmup_ratio) and 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
            ("min_lr_ratio", finite(self.min_lr_ratio) and self.min_lr_ratio >= 0, "a finite number >= 0"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("max_grad_norm", finite(self.max_grad_norm) and self.max_grad_norm >= 0, "a finite number >= 0"),
            ("eps", finite(self.eps) and self.eps > 0, "a finite number > 0"),
            ("eval_fraction", finite(self.eval_fraction) and 0 <= self.eval_fraction < 1, "in [0, 1)"),
            ("keep", self.keep >= 1, ">= 1"),
            ("logits_chunks", self.logits_chunks >= 1, ">= 1"),
        ):
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)}")
