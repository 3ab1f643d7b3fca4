"""The configuration of ``w2s compile-check``: its own YAML (``configs/tpu/*.yaml``) or a ``w2s run`` config.

Config (YAML, see ``configs/tpu/*.yaml``)::

    model: llama2-70b            # preset name (models/config.py PRESETS)
    model_overrides: {}          # ModelConfig fields, e.g. {n_layers: 2}
    remat: full                  # none | full | dots | dots_no_batch
    param_dtype: float32         # stored parameters (and so Adam moments); LoRA: the frozen base
    dtype: bfloat16              # compute dtype
    mesh: {data: 1, fsdp: -1, tensor: 1, sequence: 1}   # MeshConfig (rules: optional table)
    sft: {batch_size: 64, seq_len: 1024, grad_accum: 1, lora: null}          # train.config.TrainConfig
    dpo: {batch_size: 32, seq_len: 1024, reference: precompute, lora: null}  # (batch_size = pairs)
    generation: {batch_size: 256, prompt_len: 512, max_new_tokens: 1024, param_dtype: bfloat16,
                 mesh: null}     # generation mesh (MeshConfig); null = the training mesh
    stages: [sft, dpo, prefill, insert, decode]

``--set key=value`` overrides any key (dotted for nested ones: ``--set sft.batch_size=128``).

A ``w2s run`` config (``pipeline.config.RunConfig``) is accepted too: its strong model
(``strong.preset`` plus ``overrides``, or a local Hugging Face directory's config.json),
``strong_train`` as the SFT step, ``stage2.train`` as the DPO step, ``generation`` (batch size, max
new tokens; prompts of ``max_prompt_len`` or 1024 tokens) and ``mesh``; ``--set`` then addresses the
run config's keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from w2s_jax.core.config import load_config, load_yaml_file
from w2s_jax.core.errors import UserError
from w2s_jax.io.hf import hf_config_to_model
from w2s_jax.models.config import PRESETS, get_preset
from w2s_jax.parallel.sharding import MeshConfig
from w2s_jax.pipeline.config import RunConfig
from w2s_jax.train.config import TrainConfig

GENERATION_STAGES = ("prefill", "insert", "decode")
STAGES = ("sft", "dpo", *GENERATION_STAGES)


@dataclass
class GenerationSection:
    batch_size: int = 256
    prompt_len: int = 512
    max_new_tokens: int = 1024
    param_dtype: str = "bfloat16"
    cache_dtype: str | None = None  # default: the compute dtype
    mesh: MeshConfig | None = None  # None: the training mesh


@dataclass
class CheckConfig:
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    remat: str = "full"
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    mesh: MeshConfig = field(default_factory=lambda: MeshConfig(data=1, fsdp=-1))
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64, seq_len=1024))
    dpo: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32, seq_len=1024, loss_type="sigmoid"))
    generation: GenerationSection = field(default_factory=GenerationSection)
    stages: list[str] = field(default_factory=lambda: list(STAGES))

    def model_config(self, **extra):
        return get_preset(self.model, **{"remat": self.remat, "param_dtype": self.param_dtype, "dtype": self.dtype,
                                         **self.model_overrides, **extra})


RUN_CONFIG_KEYS = {"strong", "weak", "strong_train", "weak_train", "stage1", "stage2", "data", "baselines",
                   "grading", "pass_k", "name"}


def load_check_config(path: str | Path, overrides: list[str] = ()) -> CheckConfig:
    """A compile-check YAML, or a `w2s run` config (``RunConfig``: its strong model, ``strong_train``
    for SFT, ``stage2.train`` for DPO, ``generation`` and ``mesh``); ``overrides`` address the file's
    own keys (``strong_train.batch_size=64`` for a run config)."""
    if not Path(path).is_file():
        raise UserError(f"config file {path} does not exist")
    raw = load_yaml_file(path)
    if RUN_CONFIG_KEYS & set(raw):
        cfg = _from_run_config(path, overrides)
    else:
        cfg = load_config(CheckConfig, str(path), list(overrides))
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise UserError(f"config key `stages`: unknown stage(s) {bad}; valid: {list(STAGES)}")
    cfg.model_config()  # unknown preset / bad override -> UserError now
    return cfg


def _strong_model(spec) -> tuple[str, dict]:
    """(preset name, ModelConfig overrides) of a run config's strong model."""
    if spec.preset is not None:
        return spec.preset, dict(spec.overrides)
    p = Path(spec.path or "")
    cfg_json = p / "config.json"
    if spec.path and cfg_json.is_file():
        mc = hf_config_to_model(json.loads(cfg_json.read_text()), where=str(cfg_json))
        base = PRESETS["tiny"]
        fields = {f.name: getattr(mc, f.name) for f in dataclasses.fields(mc)
                  if f.name != "name" and getattr(mc, f.name) != getattr(base, f.name)}
        return "tiny", {**fields, "name": mc.name, **spec.overrides}
    raise UserError(
        f"compile-check needs the strong model's shape: `strong.preset` (e.g. llama2-70b) or a local Hugging Face "
        f"checkpoint directory with config.json (got strong.path={spec.path!r}); "
        "add `--set strong.preset=llama2-70b --set strong.path=null`"
    )


def _from_run_config(path, overrides) -> CheckConfig:
    rc = load_config(RunConfig, str(path), list(overrides))
    preset, ov = _strong_model(rc.strong)
    base = get_preset(preset)
    ov = dict(ov)
    remat = ov.pop("remat", base.remat)
    param_dtype = ov.pop("param_dtype", base.param_dtype)
    dtype = ov.pop("dtype", base.dtype)
    g = rc.generation
    new = max(g.max_new_tokens, rc.stage2.max_new_tokens or 0)
    prompt = g.max_prompt_len or min(1024, max(1, base.replace(**ov).max_seq_len - new))
    return CheckConfig(
        model=preset, model_overrides=ov, remat=remat, param_dtype=param_dtype, dtype=dtype, mesh=rc.mesh,
        sft=rc.strong_train, dpo=rc.stage2.train,
        generation=GenerationSection(batch_size=g.batch_size, prompt_len=prompt, max_new_tokens=new,
                                     param_dtype=param_dtype),
    )


__all__ = ["GENERATION_STAGES", "STAGES", "CheckConfig", "GenerationSection", "load_check_config"]
