"""PEFT LoRA adapters <-> w2s-jax adapters.

PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``): ``...layers.i.<module>.lora_A.weight``
``[r, in]`` -> ``a[i] = A.T`` reshaped ``[in..., r]``; ``lora_B.weight`` ``[out, r]`` -> ``b[i] = B.T``
reshaped ``[r, out...]``; scale ``lora_alpha / r``. ``use_rslora`` (scale ``alpha / sqrt(r)``) is
supported by storing ``alpha * sqrt(r)`` as our alpha (exported back as plain LoRA, same function).
DoRA, ``fan_in_fan_out``, biases, ``modules_to_save``, per-module rank/alpha patterns are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.io.hf import TOKENIZER_FILES, save_tokenizer_hf
from w2s_jax.io.modeldir import LoadedModel, atomic_directory, read_json
from w2s_jax.io.tensor_files import SafetensorsStore, materialize, shardings_for, unflatten_tree, write_safetensors
from w2s_jax.io.tokenizer import Tokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import PEFT_NAMES, TARGETS, LoRAConfig, lora_axes, lora_shapes
from w2s_jax.parallel.distributed import to_host
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules

__all__ = ["peft_config", "peft_base", "peft_tokenizer", "peft_to_lora", "load_peft", "lora_to_peft"]


_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\."
    r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


_PEFT_TO_OURS = {v: k for k, v in PEFT_NAMES.items()}


_OURS_TO_TARGET = {v: k for k, v in TARGETS.items()}


def peft_config(path: Path) -> dict:
    c = read_json(path / "adapter_config.json")
    where = path / "adapter_config.json"
    if c.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{where}: peft_type {c.get('peft_type')!r} is not supported (only LORA)")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if c.get(key) == bad:
            raise UserError(f"{where}: `{key}: {bad}` is not supported")
    if c.get("bias", "none") != "none":
        raise UserError(f"{where}: LoRA bias {c.get('bias')!r} is not supported (need 'none')")
    if c.get("modules_to_save"):
        raise UserError(f"{where}: modules_to_save {c['modules_to_save']} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise UserError(f"{where}: per-module `{key}` is not supported")
    if "r" not in c or "lora_alpha" not in c:
        raise UserError(f"{where}: missing `r` or `lora_alpha`")
    return c


def _peft_weights(path: Path) -> dict[str, np.ndarray]:
    st = path / "adapter_model.safetensors"
    if st.is_file():
        with SafetensorsStore([st], what=str(st)) as store:
            return {k: store.read(k) for k in store.keys()}
    binf = path / "adapter_model.bin"
    if binf.is_file():
        try:
            import torch
        except ImportError:
            raise UserError(f"{binf}: reading .bin adapters needs torch; convert to safetensors") from None
        try:
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{binf}: not a readable PyTorch file: {e}") from None
        return {k: v.float().numpy() for k, v in sd.items()}
    raise UserError(f"{path}: no adapter_model.safetensors (or adapter_model.bin)")


def peft_to_lora(
    path: str | os.PathLike, cfg: ModelConfig, mesh=None, rules: Rules = DEFAULT_RULES
) -> tuple[dict, LoRAConfig]:
    """``(lora, lora_cfg)`` from a PEFT LoRA directory for a base model with config ``cfg`` (float32)."""
    path = Path(path)
    c = peft_config(path)
    r = int(c["r"])
    alpha = float(c["lora_alpha"])
    if c.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # our scale alpha/r == PEFT's alpha/sqrt(r)
    weights = _peft_weights(path)
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for k, v in weights.items():
        m = _PEFT_KEY.match(k)
        if not m:
            raise UserError(f"{path}: adapter tensor `{k}` is not a LoRA A/B weight of a supported module")
        layer, mod, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= cfg.n_layers:
            raise UserError(f"{path}: adapter tensor `{k}` is for layer {layer}, the base has {cfg.n_layers} layers")
        found.setdefault(_PEFT_TO_OURS[mod], {}).setdefault(layer, {})[ab] = (k, v)
    if not found:
        raise UserError(f"{path}: adapter has no LoRA weights")
    kernels = [k for k in PEFT_NAMES if k in found]
    lcfg = LoRAConfig(rank=r, alpha=alpha, dropout=float(c.get("lora_dropout", 0.0) or 0.0),
                      targets=tuple(_OURS_TO_TARGET[k] for k in kernels))
    shapes = lora_shapes(cfg, lcfg)["layers"]
    flat = {}
    for name in kernels:
        a_shape, b_shape = shapes[name]["a"].shape, shapes[name]["b"].shape
        want_a = (r, math.prod(a_shape[1:-1]))
        want_b = (math.prod(b_shape[2:]), r)
        A = np.zeros(a_shape, np.float32)
        B = np.zeros(b_shape, np.float32)
        for i in range(cfg.n_layers):
            got = found[name].get(i, {})
            for ab, want in (("A", want_a), ("B", want_b)):
                key = f"base_model.model.model.layers.{i}.{PEFT_NAMES[name]}.lora_{ab}.weight"
                if ab not in got:
                    raise UserError(f"{path}: adapter tensor `{key}` is missing (expected shape {want})")
                k, v = got[ab]
                if tuple(v.shape) != want:
                    raise UserError(f"{path}: adapter tensor `{k}` has shape {tuple(v.shape)}, expected {want}")
            A[i] = got["A"][1].astype(np.float32).T.reshape(a_shape[1:])
            B[i] = got["B"][1].astype(np.float32).T.reshape(b_shape[1:])
        flat[f"layers.{name}.a"] = A
        flat[f"layers.{name}.b"] = B
    shardings = shardings_for(lora_axes(cfg, lcfg), lora_shapes(cfg, lcfg), mesh, rules)
    out = {k: materialize(v.shape, jnp.float32, lambda idx, v=v: v[idx], shardings[k]) for k, v in flat.items()}
    return unflatten_tree(out), lcfg


def peft_base(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base model of a PEFT adapter dir: ``base``, else its ``base_model_name_or_path`` (a local
    path, possibly relative to the adapter dir). The adapter config is checked first."""
    path = Path(path)
    c = peft_config(path)
    if base is not None:
        return Path(base)
    b = c.get("base_model_name_or_path")
    if not b:
        raise UserError(f"{path}: adapter_config.json names no base model; pass --base PATH")
    bp = Path(b)
    if not bp.is_absolute() and not bp.exists() and (path / bp).exists():
        bp = path / bp
    if not bp.exists():
        raise UserError(f"{path}: base model {b!r} (base_model_name_or_path) is not a local path; pass --base PATH")
    return bp


def peft_tokenizer(path: str | os.PathLike) -> str | None:
    """The adapter dir itself when it holds tokenizer files (they then replace the base model's)."""
    path = Path(path)
    return str(path) if any((path / f).is_file() for f in TOKENIZER_FILES) else None


def load_peft(path, base_model: LoadedModel, mesh=None, rules: Rules = DEFAULT_RULES) -> LoadedModel:
    """A PEFT adapter dir on its loaded base model (see :func:`peft_base`), unmerged."""
    path = Path(path)
    if base_model.lora is not None:
        raise UserError(f"base model {base_model.source} already carries LoRA adapters; merge them first "
                        "(--merge-lora)")
    lora, lcfg = peft_to_lora(path, base_model.cfg, mesh, rules)
    return LoadedModel(base_model.params, base_model.cfg, base_model.tokenizer, lora, lcfg, str(path), "peft")


def lora_to_peft(
    directory: str | os.PathLike,
    lora: dict,
    lora_cfg: LoRAConfig,
    cfg: ModelConfig,
    base_model_name_or_path: str | None = None,
    tokenizer: Tokenizer | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) that
    ``peft.PeftModel.from_pretrained(base_hf_model, dir)`` loads with the same function."""
    r = lora_cfg.rank
    entries = []
    for name in lora_cfg.kernel_names():
        a, b = lora["layers"][name]["a"], lora["layers"][name]["b"]
        for i in range(cfg.n_layers):
            pre = f"base_model.model.model.layers.{i}.{PEFT_NAMES[name]}"
            entries.append((f"{pre}.lora_A.weight", (r, math.prod(a.shape[1:-1])), np.dtype(np.float32),
                            lambda a=a, i=i: [to_host(a[i]).astype(np.float32).reshape(-1, r).T]))
            entries.append((f"{pre}.lora_B.weight", (math.prod(b.shape[2:]), r), np.dtype(np.float32),
                            lambda b=b, i=i: [to_host(b[i]).astype(np.float32).reshape(r, -1).T]))
    alpha = lora_cfg.alpha
    conf = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": [PEFT_NAMES[n].split(".")[-1] for n in lora_cfg.kernel_names()],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(directory)
    with atomic_directory(out, (), overwrite) as tmp:
        write_safetensors(tmp / "adapter_model.safetensors", entries, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        save_tokenizer_hf(tokenizer, tmp)
    return out
