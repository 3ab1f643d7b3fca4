"""Models from a preset name or a checkpoint path: :func:`load`, the notebook entry point (``wm.load``).

The one module of ``models`` that imports from a higher layer (an exception in the import-linter
contract): it reads checkpoints through ``io.native``, whose modules import the models package.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from w2s_jax.core.errors import UserError
from w2s_jax.io import native
from w2s_jax.models.config import PRESETS, get_preset
from w2s_jax.models.llama import Llama
from w2s_jax.models.lora import add_lora
from w2s_jax.models.params import init_params
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules

__all__ = ["load"]


def load(spec: str | os.PathLike, *, mesh=None, rules: Rules = DEFAULT_RULES, seed: int = 0, dtype=None,
         tokenizer=None, **overrides) -> Llama:
    """A :class:`Llama` from a preset name or a checkpoint path.

    A preset (``"tiny"``, ``"llama3-8b"``, ... see ``config.PRESETS``; ``overrides`` replace config
    fields) is initialised at random from ``seed`` (``init_params(cfg, jax.random.PRNGKey(seed))``).
    A path is read with ``io.native.load_model`` (native, Hugging Face, GGUF or PEFT; ``dtype`` and
    ``tokenizer`` are passed on); saved adapters are attached as ``model.lora``. With ``mesh`` the
    weights are created or read directly with their shardings."""
    path = Path(spec)
    if not path.exists() and str(spec) not in PRESETS:
        try:
            get_preset(str(spec))
        except UserError as e:
            raise UserError(f"`{spec}` is no file or directory, and {e}") from None
    if path.exists():
        loaded = native.load_model(path, mesh=mesh, rules=rules, dtype=dtype, tokenizer=tokenizer)
        cfg = loaded.cfg.replace(**overrides)
        model = Llama.from_params(cfg, loaded.params)
        if loaded.lora is not None:
            add_lora(model, loaded.lora_cfg, lora=loaded.lora)
        return model
    cfg = get_preset(str(spec), **overrides)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
    return Llama.from_params(cfg, init_params(cfg, jax.random.PRNGKey(seed), mesh, rules))
