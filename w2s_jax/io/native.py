"""Model directories: the native format, and loading any supported checkpoint into sharded arrays.

Native model directory (``save_model``)::

    w2s_model.json       {"format": "w2s-jax", "version": 1, "model": ModelConfig fields,
                          "tokenizer": tokenizer spec (see tokenizer.py), "lora": LoRAConfig fields | null,
                          "checksums": {"params.safetensors": SHA-256, ...}}  (verified on load)
    .w2s-written         marker: a directory w2s-jax wrote (only such a directory is replaced)
    params.safetensors   flattened parameter tree: "embed", "layers.wq", ..., "final_norm", "lm_head"
    lora.safetensors     optional adapters: "layers.wq.a", "layers.wq.b", ...
    tokenizer files      (Hugging Face tokenizers) or w2s_tokenizer.json (the byte tokenizer)

``load_model(path)`` auto-detects a native directory, a Hugging Face safetensors directory (single
file or sharded with ``model.safetensors.index.json``), a ``.gguf`` file, and a PEFT adapter
directory (``adapter_config.json``; the base model comes from ``base=`` or the adapter's
``base_model_name_or_path``). The format-specific readers live in ``hf.py``, ``gguf.py`` and ``peft.py``;
the safetensors machinery in ``tensor_files.py``.

Memory, honestly:

- safetensors sources (native and Hugging Face) are read with ``safe_open(...).get_slice``. With a
  mesh, every parameter is built with ``jax.make_array_from_callback`` and its ``NamedSharding``
  from ``param_shardings(cfg, mesh, rules)``: each device's shard is read from the file straight
  into that shard, one layer at a time, so no host ever holds a whole stacked parameter (a
  replicated parameter is read once per local device). Without a mesh, each parameter is read whole
  on the host and then put on the default device, one parameter at a time.
- GGUF tensors are quantized and cannot be sliced: each stacked parameter is dequantized whole on
  the host (float32) and then ``device_put`` with its sharding, so peak host memory is one stacked
  parameter in float32 (fine for the small models GGUF files are used for here).
- Saving gathers one layer of one parameter at a time to the host (``process_allgather`` when the
  array spans hosts) and streams it into the file; only process 0 writes. The directory is written
  under a temporary name and renamed into place, so an interrupted save never leaves a half model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.io.gguf import load_gguf
from w2s_jax.io.hf import load_hf
from w2s_jax.io.modeldir import LoadedModel, atomic_directory, check_params, check_tokenizer_vocab, read_json
from w2s_jax.io.peft import load_peft, peft_base, peft_tokenizer
from w2s_jax.io.tensor_files import (
    SafetensorsStore,
    flatten_tree,
    layer_chunks,
    load_tree_from_store,
    verify_checksums,
    write_safetensors,
)
from w2s_jax.io.tokenizer import Tokenizer, load_tokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import LoRAConfig, lora_axes, lora_shapes
from w2s_jax.models.params import param_axes, param_shapes
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules

META_FILE = "w2s_model.json"


PARAMS_FILE = "params.safetensors"


LORA_FILE = "lora.safetensors"


FORMAT_VERSION = 1

__all__ = ["LoadedModel", "META_FILE", "PARAMS_FILE", "LORA_FILE", "save_model", "load_model", "detect_format",
           "tokenizer_of", "model_fingerprint"]


def _config_from_dict(d: dict, where: str) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise UserError(f"{where}: unknown model config key(s) {unknown} (written by a newer w2s-jax?)")
    try:
        return ModelConfig(**d)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: invalid model config: {e}") from None


def _lora_config_from_dict(d: dict, where: str) -> LoRAConfig:
    fields = {f.name for f in dataclasses.fields(LoRAConfig)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise UserError(f"{where}: unknown LoRA config key(s) {unknown}")
    d = dict(d)
    if "targets" in d:
        d["targets"] = tuple(d["targets"])
    return LoRAConfig(**d)


def save_model(
    directory: str | os.PathLike,
    params: dict,
    cfg: ModelConfig,
    tokenizer: Tokenizer | None,
    lora: dict | None = None,
    lora_cfg: LoRAConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a native model directory (see the module docstring); returns its path.

    Arrays may be sharded (across hosts too): each is gathered to the host one layer at a time.
    Written to a temporary directory and renamed into place (replacing an earlier model dir)."""
    check_params(params, cfg, str(directory))
    if (lora is None) != (lora_cfg is None):
        raise UserError("save_model: pass both `lora` and `lora_cfg`, or neither")
    out = Path(directory)
    with atomic_directory(out, (META_FILE,), overwrite) as tmp:
        tok_spec = None
        if tokenizer is not None and jax.process_index() == 0:
            tok_spec = tokenizer.save(tmp)
        entries = [
            (k, tuple(v.shape), np.dtype(v.dtype), (lambda v=v: layer_chunks(v)))
            for k, v in flatten_tree(params).items()
        ]
        sums = {PARAMS_FILE: write_safetensors(tmp / PARAMS_FILE, entries, {"format": "w2s-jax"})}
        if lora is not None:
            entries = [
                (k, tuple(v.shape), np.dtype(v.dtype), (lambda v=v: layer_chunks(v)))
                for k, v in flatten_tree(lora).items()
            ]
            sums[LORA_FILE] = write_safetensors(tmp / LORA_FILE, entries, {"format": "w2s-jax"})
        meta = {
            "format": "w2s-jax",
            "version": FORMAT_VERSION,
            "model": dataclasses.asdict(cfg),
            "tokenizer": tok_spec,
            "lora": None if lora_cfg is None else {**dataclasses.asdict(lora_cfg), "targets": list(lora_cfg.targets)},
            "checksums": sums,  # SHA-256 of each tensor file, verified when loading
        }
        if jax.process_index() == 0:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def detect_format(path: str | os.PathLike) -> str:
    """``native`` | ``hf`` | ``gguf`` | ``peft`` for a path, or a UserError saying what was expected."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model path {p} does not exist")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        if p.name == META_FILE:
            return "native"
        raise UserError(f"{p}: not a model (expected a directory or a .gguf file)")
    if (p / META_FILE).is_file():
        return "native"
    if (p / "adapter_config.json").is_file():
        return "peft"
    if (p / "config.json").is_file():
        if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
            return "hf"
        if any(p.glob("*.bin")) or any(p.glob("*.pth")):
            raise UserError(
                f"{p}: only safetensors checkpoints are supported (found PyTorch .bin files); convert with "
                "`transformers`: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)"
            )
        raise UserError(f"{p}: has config.json but no model.safetensors or model.safetensors.index.json")
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise UserError(
        f"{p}: not a model directory: expected {META_FILE} (native), config.json + model.safetensors "
        "(Hugging Face), adapter_config.json (PEFT) or a .gguf file"
    )


def _load_native(path: Path, mesh, rules, dtype, tokenizer) -> LoadedModel:
    if path.is_file():
        path = path.parent
    meta_path = path / META_FILE
    meta = read_json(meta_path)
    if meta.get("format") != "w2s-jax" or "model" not in meta:
        raise UserError(f"{meta_path}: not a w2s-jax model file (missing format/model)")
    if meta.get("version", 1) > FORMAT_VERSION:
        raise UserError(f"{meta_path}: format version {meta['version']} is newer than this w2s-jax ({FORMAT_VERSION})")
    cfg = _config_from_dict(meta["model"], str(meta_path))
    if dtype is not None:
        cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif meta.get("tokenizer"):
        tok = load_tokenizer(meta["tokenizer"], base_dir=path)
    else:
        tok = None
    check_tokenizer_vocab(tok, cfg, str(path))
    if "checksums" in meta:  # (directories written before checksums were recorded have none)
        verify_checksums(path, meta["checksums"], str(meta_path))
    with SafetensorsStore([path / PARAMS_FILE], what=str(path / PARAMS_FILE)) as store:
        params = load_tree_from_store(store, param_shapes(cfg), param_axes(cfg), mesh, rules, str(path / PARAMS_FILE))
    lora = lora_cfg = None
    if meta.get("lora"):
        lora_cfg = _lora_config_from_dict(meta["lora"], str(meta_path))
        with SafetensorsStore([path / LORA_FILE], what=str(path / LORA_FILE)) as store:
            shapes = lora_shapes(cfg, lora_cfg, jnp.float32)
            lora = load_tree_from_store(store, shapes, lora_axes(cfg, lora_cfg), mesh, rules, str(path / LORA_FILE))
    return LoadedModel(params, cfg, tok, lora, lora_cfg, str(path), "native")


def load_model(
    path: str | os.PathLike,
    mesh=None,
    rules: Rules = DEFAULT_RULES,
    dtype=None,
    base: str | os.PathLike | None = None,
    tokenizer=None,
) -> LoadedModel:
    """Load any supported checkpoint (format auto-detected, see the module docstring).

    ``mesh``: place every parameter directly with its NamedSharding (``param_shardings``).
    ``dtype``: parameter dtype (default: native = as saved in w2s_model.json; HF = the stored float
    type of the embedding; GGUF = float32). For HF/GGUF the compute dtype (``cfg.dtype``) is float32
    for float32 parameters and bfloat16 otherwise; change it with ``cfg.replace(dtype=...)``.
    LoRA adapters are always loaded in float32. ``base``: base model of a PEFT adapter dir (overrides
    ``base_model_name_or_path``). ``tokenizer``: a spec/path overriding the model's own.
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "native":
        return _load_native(p, mesh, rules, dtype, tokenizer)
    if fmt == "hf":
        return load_hf(p, mesh=mesh, rules=rules, dtype=dtype, tokenizer=tokenizer)
    if fmt == "gguf":
        if p.is_dir():
            p = sorted(p.glob("*.gguf"))[0]
        return load_gguf(p, mesh=mesh, rules=rules, dtype=dtype, tokenizer=tokenizer)
    base_path = peft_base(p, base)
    if tokenizer is None:
        tokenizer = peft_tokenizer(p)
    bm = load_model(base_path, mesh=mesh, rules=rules, dtype=dtype, tokenizer=tokenizer)
    return load_peft(p, bm, mesh=mesh, rules=rules)


def tokenizer_of(model: LoadedModel) -> Tokenizer:
    """The model's tokenizer or a UserError saying how to supply one."""
    if model.tokenizer is None:
        raise UserError(f"model {model.source} has no tokenizer files; pass a tokenizer (--tokenizer PATH|byte)")
    return model.tokenizer


def model_fingerprint(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A fingerprint of the model files at ``path`` (and of ``base`` for a PEFT adapter), cheap to take
    before loading: every file's name and size plus a hash of its first and last MiB (for a native
    directory the recorded per-file checksums cover the whole content). Different models give
    different fingerprints; copying or moving a model keeps its fingerprint."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name if p.is_file() else f.relative_to(p).as_posix()}:{size};".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    if base is not None:
        h.update(model_fingerprint(base).encode())
    return h.hexdigest()[:16]
