"""Where a model comes from, and the one loader of it: the ``weak:``/``strong:`` sections of ``w2s run``
and the ``model:`` section of ``w2s sft``/``w2s dpo``.

A :class:`ModelSpec` names a checkpoint ``path`` (native dir, Hugging Face dir, ``.gguf`` file, PEFT
adapter dir, or a hub address ``hf://OWNER/REPO/FILE``) or a ``preset`` initialised at random.
``overrides`` are ModelConfig fields: on a checkpoint the runtime ones (dtype, remat, ...; the shapes
come from the checkpoint), on a preset any. An unknown field is an error naming the key.

A preset's vocabulary is the tokenizer's (``tokenizer``, default ``byte``): a preset with a smaller
``vocab_size`` is widened to fit it, unless ``overrides.vocab_size`` asks for a smaller one (an error);
its BOS/EOS/padding ids are the tokenizer's.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from w2s_jax.core.errors import UserError
from w2s_jax.io import weights
from w2s_jax.io.native import load_model
from w2s_jax.io.tokenizer import load_tokenizer
from w2s_jax.models.config import ModelConfig, get_preset
from w2s_jax.models.params import init_params
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules
from w2s_jax.train.loop import TrainModel

__all__ = ["ModelSpec", "check_model_spec", "resolve_model_spec", "with_overrides", "preset_config",
           "preset_model", "load_model_spec"]


@dataclass
class ModelSpec:
    """Where a model comes from: a checkpoint ``path`` (native dir, Hugging Face dir, .gguf, PEFT
    adapter dir) or a ``preset`` initialised at random (tiny demo/test models)."""

    path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (n_layers, dtype, ...)
    tokenizer: str | None = None  # "byte" or a tokenizer dir; default: the checkpoint's own
    base: str | None = None  # base model for a PEFT adapter path
    seed: int = 0


def with_overrides(cfg: ModelConfig, overrides: dict[str, Any], flag: str = "model") -> ModelConfig:
    """``cfg`` with ``overrides`` (ModelConfig fields); an unknown or invalid one is a UserError naming
    ``<flag>.overrides.<key>``."""
    names = {f.name for f in dataclasses.fields(cfg)}
    bad = [k for k in overrides if k not in names]
    if bad:
        close = difflib.get_close_matches(bad[0], names, n=1)
        hint = f" (did you mean `{flag}.overrides.{close[0]}`?)" if close else ""
        raise UserError(f"unknown key `{flag}.overrides.{bad[0]}`{hint}")
    try:
        return cfg.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise UserError(f"{flag}.overrides: {e}") from None


def check_model_spec(spec: ModelSpec, flag: str = "model") -> None:
    """Fail fast, before any long work: exactly one of ``path``/``preset``; a local path exists; a
    preset and its overrides are valid."""
    if (spec.path is None) == (spec.preset is None):
        raise UserError(f"config key `{flag}`: give exactly one of `{flag}.path` or `{flag}.preset`")
    if spec.path is not None and "://" not in spec.path and not Path(spec.path).exists():
        raise UserError(f"config key `{flag}.path`: model path {spec.path} does not exist")
    if spec.preset is not None:
        with_overrides(get_preset(spec.preset), spec.overrides, flag)


def resolve_model_spec(spec: ModelSpec, flag: str = "model", log: Callable[[str], None] = print) -> ModelSpec:
    """``spec`` with hub addresses (``hf://...``) in ``path``/``base`` replaced by local files, fetched
    into the cache on first use (see ``w2s_jax/io/weights.py``)."""
    for key in ("path", "base"):
        v = getattr(spec, key)
        if weights.is_remote(v):
            spec = dataclasses.replace(spec, **{key: weights.resolve(v, log=log, flag=f"{flag}.{key}")})
    return spec


def preset_config(spec: ModelSpec, tokenizer, flag: str = "model") -> ModelConfig:
    """The ModelConfig of a preset spec for ``tokenizer`` (vocabulary and special ids; module docstring)."""
    cfg = with_overrides(get_preset(spec.preset), spec.overrides, flag)
    if tokenizer.vocab_size > cfg.vocab_size:
        if "vocab_size" in spec.overrides:
            raise UserError(f"config key `{flag}.overrides.vocab_size`: {cfg.vocab_size} is smaller than the "
                            f"tokenizer's vocabulary ({tokenizer.vocab_size})")
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    return cfg.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def preset_model(spec: ModelSpec, mesh=None, rules: Rules = DEFAULT_RULES, flag: str = "model") -> TrainModel:
    """A preset spec's model: its tokenizer, config and parameters initialised from ``seed``."""
    tok = load_tokenizer(spec.tokenizer or "byte")
    cfg = preset_config(spec, tok, flag)
    params = init_params(cfg, jax.random.key(spec.seed), mesh, rules)
    return TrainModel(params, cfg, tok)


def load_model_spec(spec: ModelSpec, mesh=None, rules: Rules = DEFAULT_RULES, flag: str = "model"):
    """The model of ``spec``: a checkpoint loaded (its overrides applied) or a preset initialised."""
    check_model_spec(spec, flag)
    if spec.preset is not None:
        return preset_model(spec, mesh, rules, flag)
    model = load_model(spec.path, mesh=mesh, rules=rules, base=spec.base, tokenizer=spec.tokenizer)
    if spec.overrides:
        model.cfg = with_overrides(model.cfg, spec.overrides, flag)
    return model
