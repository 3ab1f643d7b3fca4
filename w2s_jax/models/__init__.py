"""Models of the Llama family: the NNX model (:class:`Llama`), its config, presets and :func:`load`.

``load`` is the entry point for notebooks and scripts::

    from flax import nnx
    import w2s_jax.models as wm

    model = wm.load("tiny")            # a preset, randomly initialised
    model = wm.load("path/to/model")   # a native, Hugging Face, GGUF or PEFT checkpoint
    nnx.display(model)
    logits = model(tokens)

The model's parts are modules too (:class:`Embedding`, :class:`RMSNorm`, :class:`Attention`,
:class:`MLP`, :class:`DecoderLayer`): ``model.layer(0).attention(h)``, or ``wm.MLP(cfg, rngs=nnx.Rngs(0))``
on its own.

The functional pieces (``decoder.forward``, ``params.init_params``, ``lora``) are what training,
scoring and generation compile; the module wraps the same parameter dict (``model.params()``).
"""

from __future__ import annotations

import importlib

__all__ = ["BASE", "MLP", "Adapters", "Attention", "DecoderLayer", "Embedding", "Llama", "LoRAConfig", "ModelConfig",
           "RMSNorm", "add_lora", "get_preset", "load"]

# where each public name lives; it is imported on first use (see __getattr__)
_HOMES = {"BASE": "llama", "DecoderLayer": "llama", "Llama": "llama", "Embedding": "llama", "RMSNorm": "llama",
          "Attention": "llama", "MLP": "llama", "Adapters": "lora", "LoRAConfig": "lora",
          "add_lora": "lora", "ModelConfig": "config", "get_preset": "config", "load": "loading"}


def __getattr__(name: str):
    """The package's public names, imported when first used: importing a submodule such as
    ``w2s_jax.models.config`` (model shapes; no JAX) stays light, and ``wm.load`` / ``wm.Llama`` bring
    in JAX and Flax when asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
