"""Checkpoint conversion: Hugging Face safetensors, GGUF and PEFT adapters <-> w2s-jax parameters.

Hugging Face -> ours (per layer i; weights are torch ``[out, in]``)::

    model.embed_tokens.weight                    embed [V, D]
    model.layers.i.input_layernorm.weight        layers.attn_norm[i]
    model.layers.i.self_attn.q_proj.weight       layers.wq[i] = W.T reshaped [D, H, Dh]   (k, v: [D, K, Dh])
    model.layers.i.self_attn.o_proj.weight       layers.wo[i] = W.T reshaped [H, Dh, D]
    model.layers.i.post_attention_layernorm.weight  layers.mlp_norm[i]
    model.layers.i.mlp.{gate,up,down}_proj.weight   layers.w_{gate,up,down}[i] = W.T
    model.norm.weight                            final_norm
    lm_head.weight                               lm_head = W.T (absent when tied)

Norm weights are copied as they are (Gemma stores the ``w`` of ``1 + w``, as does our model).
The same mapping in memory, without files: ``params_to_state_dict`` / ``state_dict_to_params``.

GGUF (llama architecture, e.g. SmolLM2): tensors are dequantized with ``gguf.quants.dequantize``;
llama.cpp permutes the rows of ``attn_q``/``attn_k`` (interleaved rotary pairs), which is undone
exactly as transformers' ``LlamaTensorProcessor._reverse_permute_weights`` does; the result is then
read with the Hugging Face mapping above.

PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``): ``...layers.i.<module>.lora_A.weight``
``[r, in]`` -> ``a[i] = A.T`` reshaped ``[in..., r]``; ``lora_B.weight`` ``[out, r]`` -> ``b[i] = B.T``
reshaped ``[r, out...]``; scale ``lora_alpha / r``. ``use_rslora`` (scale ``alpha / sqrt(r)``) is
supported by storing ``alpha * sqrt(r)`` as our alpha (exported back as plain LoRA, same function).
DoRA, ``fan_in_fan_out``, biases, ``modules_to_save``, per-module rank/alpha patterns are refused.

CLI: ``w2s convert --from hf|gguf|native|peft --input PATH --output DIR [--to native|hf|peft]
[--base BASE] [--dtype D] [--merge-lora] [--max-shard-size 5GB]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.io.native import (
    _ST_NAMES,
    FLOAT_CODES,
    LoadedModel,
    SafetensorsStore,
    atomic_directory,
    check_params,
    check_tokenizer_vocab,
    flatten_tree,
    load_model,
    materialize,
    save_model,
    shardings_for,
    to_host,
    unflatten_tree,
    write_safetensors,
)
from w2s_jax.io.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import PEFT_NAMES, TARGETS, LoRAConfig, lora_axes, lora_shapes, merge_lora
from w2s_jax.models.params import param_axes, param_shapes
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules

__all__ = [
    "hf_config_to_model",
    "model_to_hf_config",
    "hf_to_params",
    "load_hf",
    "params_to_hf",
    "params_to_state_dict",
    "state_dict_to_params",
    "gguf_to_params",
    "load_gguf",
    "peft_to_lora",
    "load_peft",
    "lora_to_peft",
    "main",
]

SUPPORTED_HF = ("llama", "mistral", "gemma")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# ----------------------------------------------------------------------------- HF config


def _rope_from_hf(c: dict, where: str) -> dict:
    """rope settings from a transformers 5 (`rope_parameters`) or 4.x (`rope_theta`/`rope_scaling`) config."""
    rp = c.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" not in rp and len(rp) and all(isinstance(v, dict) for v in rp.values()):
        raise UserError(f"{where}: per-layer-type rope_parameters are not supported")
    scaling = dict(rp) if isinstance(rp, dict) else dict(c.get("rope_scaling") or {})
    theta = scaling.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind in (None, "default"):
        out["rope_scaling"] = None
    elif kind == "llama3":
        try:
            out.update(
                rope_scaling="llama3",
                rope_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_pos=int(scaling["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise UserError(f"{where}: llama3 rope scaling is missing `{e.args[0]}`") from None
    else:
        raise UserError(f"{where}: unsupported rope scaling type {kind!r} (supported: default, llama3)")
    return out


def _first_id(v):
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def hf_config_to_model(c: dict, name: str = "hf", where: str = "config.json") -> ModelConfig:
    """A transformers ``config.json`` dict (llama / mistral / gemma) as a ModelConfig."""
    mt = c.get("model_type")
    if mt not in SUPPORTED_HF:
        raise UserError(f"{where}: unknown architecture model_type={mt!r}; supported: {list(SUPPORTED_HF)}")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise UserError(f"{where}: `{flag}: true` is not supported (the decoder has no biases)")
    if mt == "gemma":
        act = c.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_fast", "gelu_new"):
            raise UserError(f"{where}: Gemma hidden_activation {act!r} is not supported (need gelu_pytorch_tanh)")
        activation = "gelu_tanh"
    else:
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UserError(f"{where}: hidden_act {act!r} is not supported for {mt} (need silu)")
        activation = "silu"
    try:
        D = int(c["hidden_size"])
        H = int(c["num_attention_heads"])
        kw = dict(
            name=name,
            vocab_size=int(c["vocab_size"]),
            d_model=D,
            n_layers=int(c["num_hidden_layers"]),
            n_heads=H,
            n_kv_heads=int(c.get("num_key_value_heads") or H),
            head_dim=int(c.get("head_dim") or D // H),
            d_ff=int(c["intermediate_size"]),
        )
    except KeyError as e:
        raise UserError(f"{where}: missing key `{e.args[0]}`") from None
    kw.update(_rope_from_hf(c, where))
    sw = c.get("sliding_window") if mt == "mistral" else None
    if mt != "mistral" and c.get("sliding_window") and c.get("use_sliding_window", True):
        raise UserError(f"{where}: sliding_window is only supported for mistral")
    gemma = mt == "gemma"
    kw.update(
        max_seq_len=int(c.get("max_position_embeddings", 4096)),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        activation=activation,
        tie_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        scale_embeddings=gemma,
        norm_plus_one=gemma,
        sliding_window=int(sw) if sw else None,
        bos_token_id=_first_id(c.get("bos_token_id")),
        eos_token_id=_first_id(c.get("eos_token_id")),
        pad_token_id=_first_id(c.get("pad_token_id")),
    )
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def _hf_model_type(cfg: ModelConfig) -> str:
    gemma_flags = (cfg.norm_plus_one, cfg.scale_embeddings, cfg.activation == "gelu_tanh")
    if all(gemma_flags):
        if cfg.sliding_window:
            raise UserError("cannot export: Gemma with a sliding window has no transformers equivalent")
        return "gemma"
    if any(gemma_flags):
        raise UserError(
            "cannot export to transformers: norm_plus_one / scale_embeddings / gelu_tanh must all be set (Gemma) "
            f"or all unset (Llama/Mistral); got {gemma_flags}"
        )
    if cfg.sliding_window:
        return "mistral"
    return "llama"


def model_to_hf_config(cfg: ModelConfig):
    """A ``transformers`` PretrainedConfig for ``cfg`` (LlamaConfig / MistralConfig / GemmaConfig)."""
    from transformers import AutoConfig

    mt = _hf_model_type(cfg)
    if mt == "mistral" and cfg.rope_scaling:
        raise UserError("cannot export: Mistral with llama3 rope scaling has no transformers equivalent")
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM"}[mt]
    kw: dict[str, Any] = dict(
        architectures=[arch],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        dtype=jnp.dtype(cfg.param_dtype).name,
    )
    if cfg.rope_scaling == "llama3":
        kw["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_pos,
        }
    if mt == "gemma":
        kw.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh")
    else:
        kw.update(hidden_act="silu")
    if mt == "mistral":
        kw["sliding_window"] = cfg.sliding_window
    if mt == "llama":
        kw.update(attention_bias=False, mlp_bias=False)
    return AutoConfig.for_model(mt, **kw)


# ----------------------------------------------------------------------------- HF tensors


def _hf_layout(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """Our flat parameter name -> (HF tensor name, with ``{i}`` for the layer; conversion kind)."""
    lay = "model.layers.{i}."
    out = {
        "embed": ("model.embed_tokens.weight", "copy"),
        "layers.attn_norm": (lay + "input_layernorm.weight", "copy"),
        "layers.wq": (lay + "self_attn.q_proj.weight", "qkv"),
        "layers.wk": (lay + "self_attn.k_proj.weight", "qkv"),
        "layers.wv": (lay + "self_attn.v_proj.weight", "qkv"),
        "layers.wo": (lay + "self_attn.o_proj.weight", "o"),
        "layers.mlp_norm": (lay + "post_attention_layernorm.weight", "copy"),
        "layers.w_gate": (lay + "mlp.gate_proj.weight", "T"),
        "layers.w_up": (lay + "mlp.up_proj.weight", "T"),
        "layers.w_down": (lay + "mlp.down_proj.weight", "T"),
        "final_norm": ("model.norm.weight", "copy"),
    }
    if not cfg.tie_embeddings:
        out["lm_head"] = ("lm_head.weight", "T")
    return out


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF tensor shape for one (per-layer) parameter of our ``shape``."""
    if kind == "copy":
        return shape
    if kind == "T":
        return shape[::-1]
    if kind == "qkv":  # [D, N, Dh] <- [N*Dh, D]
        return (shape[1] * shape[2], shape[0])
    if kind == "o":  # [H, Dh, D] <- [D, H*Dh]
        return (shape[2], shape[0] * shape[1])
    raise ValueError(kind)


def _read_hf_block(store, name: str, kind: str, idx: tuple[slice, ...], head_dim: int) -> np.ndarray:
    """The block ``idx`` (our per-layer layout) of HF tensor ``name``, reading only that block."""
    if kind == "copy":
        return store.read(name, idx)
    if kind == "T":
        i, o = idx
        return store.read(name, (o, i)).T
    if kind == "qkv":
        ds, ns, hs = idx
        a = store.read(name, (slice(ns.start * head_dim, ns.stop * head_dim), ds))  # [n*Dh, d]
        a = a.reshape(ns.stop - ns.start, head_dim, -1)[:, hs, :]
        return a.transpose(2, 0, 1)
    if kind == "o":
        ns, hs, ds = idx
        a = store.read(name, (ds, slice(ns.start * head_dim, ns.stop * head_dim)))  # [d, n*Dh]
        return a.T.reshape(ns.stop - ns.start, head_dim, -1)[:, hs, :]
    raise ValueError(kind)


def _to_hf_layout(kind: str, a: np.ndarray) -> np.ndarray:
    """One per-layer parameter of ours -> the HF tensor."""
    if kind == "copy":
        return a
    if kind == "T":
        return a.T
    if kind == "qkv":
        return a.reshape(a.shape[0], -1).T
    if kind == "o":
        return a.reshape(-1, a.shape[-1]).T
    raise ValueError(kind)


def _check_hf_tensors(store, cfg: ModelConfig, where: str) -> None:
    shapes = flatten_tree(param_shapes(cfg))
    for ours, (hf, kind) in _hf_layout(cfg).items():
        stacked = ours.startswith("layers.")
        want = _hf_shape(kind, tuple(shapes[ours].shape[1:] if stacked else shapes[ours].shape))
        for i in range(cfg.n_layers) if stacked else [None]:
            name = hf.format(i=i)
            if name not in store:
                raise UserError(f"{where}: tensor `{name}` is missing (expected shape {want})")
            if store.shape(name) != want:
                raise UserError(
                    f"{where}: tensor `{name}` has shape {store.shape(name)}, but the config implies {want}"
                )
            if store.dtype(name) not in FLOAT_CODES:
                raise UserError(f"{where}: tensor `{name}` has dtype {store.dtype(name)}, expected a float type")
    biases = [k for k in store.keys() if k.endswith(".bias")]
    if biases:
        raise UserError(f"{where}: bias tensors are not supported (e.g. `{biases[0]}`)")


def read_hf_params(store, cfg: ModelConfig, mesh=None, rules: Rules = DEFAULT_RULES, where: str = "") -> dict:
    """Our parameter tree from a store with HF tensor names (safetensors, or GGUF via ``_GGUFStore``)."""
    _check_hf_tensors(store, cfg, where)
    shapes = flatten_tree(param_shapes(cfg))
    shardings = shardings_for(param_axes(cfg), param_shapes(cfg), mesh, rules)
    out = {}
    for ours, (hf, kind) in _hf_layout(cfg).items():
        s = shapes[ours]
        if ours.startswith("layers."):

            def reader(idx, hf=hf, kind=kind):
                layers = range(*idx[0].indices(cfg.n_layers))
                return np.stack([_read_hf_block(store, hf.format(i=i), kind, idx[1:], cfg.head_dim) for i in layers])
        else:

            def reader(idx, hf=hf, kind=kind):
                return _read_hf_block(store, hf, kind, idx, cfg.head_dim)

        out[ours] = materialize(s.shape, s.dtype, reader, shardings[ours], store.supports_slicing)
    return unflatten_tree(out)


class _ArrayStore:
    """An in-memory state dict (HF tensor name -> array) as a tensor store for ``read_hf_params``."""

    supports_slicing = True

    def __init__(self, sd: dict):
        self.arrays = {k: np.asarray(v) for k, v in sd.items()}

    def __contains__(self, name):
        return name in self.arrays

    def keys(self):
        return list(self.arrays)

    def shape(self, name):
        return tuple(self.arrays[name].shape)

    def dtype(self, name):
        dt = self.arrays[name].dtype
        return _ST_NAMES.get(dt, dt.name)

    def read(self, name, index=None):
        a = self.arrays[name]
        return a if index is None else a[tuple(index)]


def state_dict_to_params(sd: dict, cfg: ModelConfig, mesh=None, rules: Rules = DEFAULT_RULES) -> dict:
    """Our parameter tree (``cfg.param_dtype``) from an in-memory Hugging Face state dict: HF tensor
    name -> numpy array, e.g. ``{k: v.detach().numpy() for k, v in model.state_dict().items()}``.
    The mapping and checks of ``load_hf``; entries it does not use (a tied ``lm_head.weight``) are ignored."""
    return read_hf_params(_ArrayStore(sd), cfg, mesh, rules, where="state_dict")


def _hf_tensors(params: dict, cfg: ModelConfig, fetch=to_host):
    """``(HF name, HF shape, dtype, get)`` for each HF tensor of ``params``, where ``get()`` returns the
    tensor in HF layout (one layer of one parameter, taken out with ``fetch``)."""
    flat = flatten_tree(params)
    for ours, (hf, kind) in _hf_layout(cfg).items():
        x = flat[ours]
        dt = np.dtype(x.dtype)
        if ours.startswith("layers."):
            for i in range(cfg.n_layers):
                get = lambda x=x, i=i, kind=kind: _to_hf_layout(kind, fetch(x[i]))
                yield hf.format(i=i), _hf_shape(kind, tuple(x.shape[1:])), dt, get
        else:
            yield hf, _hf_shape(kind, tuple(x.shape)), dt, lambda x=x, kind=kind: _to_hf_layout(kind, fetch(x))


def params_to_state_dict(params: dict, cfg: ModelConfig, host: bool = True) -> dict:
    """Our parameters as an in-memory Hugging Face state dict (HF tensor name -> array in HF layout,
    the tensors ``params_to_hf`` writes; no ``lm_head.weight`` when the embeddings are tied).
    ``host``: C-contiguous numpy arrays; else arrays of the parameters' own type (JAX arrays stay on
    their devices)."""
    if host:
        return {name: np.ascontiguousarray(get()) for name, _, _, get in _hf_tensors(params, cfg)}
    return {name: get() for name, _, _, get in _hf_tensors(params, cfg, fetch=lambda a: a)}


def _hf_files(path: Path) -> dict[str, Path] | list[Path]:
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{idx}: malformed index ({e})") from None
        return {k: path / v for k, v in wm.items()}
    return [path / "model.safetensors"]


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: malformed JSON: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{p}: expected a JSON object")
    return d


def _default_dtype(code: str) -> str:
    return {"BF16": "bfloat16", "F16": "float16"}.get(code, "float32")


def hf_to_params(
    path: str | os.PathLike, mesh=None, rules: Rules = DEFAULT_RULES, dtype=None
) -> tuple[dict, ModelConfig]:
    """``(params, cfg)`` from a Hugging Face safetensors directory (streamed, see checkpoint_io)."""
    m = load_hf(path, mesh=mesh, rules=rules, dtype=dtype, tokenizer=False)
    return m.params, m.cfg


def load_hf(path, mesh=None, rules: Rules = DEFAULT_RULES, dtype=None, tokenizer=None) -> LoadedModel:
    """A Hugging Face directory as a LoadedModel. ``tokenizer=False`` skips the tokenizer."""
    path = Path(path)
    c = _read_json(path / "config.json")
    cfg = hf_config_to_model(c, name=path.name, where=str(path / "config.json"))
    with SafetensorsStore(_hf_files(path), what=str(path)) as store:
        stored = store.dtype("model.embed_tokens.weight") if "model.embed_tokens.weight" in store else "F32"
        pdt = jnp.dtype(dtype).name if dtype is not None else _default_dtype(stored)
        cfg = cfg.replace(param_dtype=pdt, dtype="float32" if pdt == "float32" else "bfloat16")
        tok = _maybe_tokenizer(path, tokenizer)
        check_tokenizer_vocab(tok, cfg, str(path))
        params = read_hf_params(store, cfg, mesh, rules, where=str(path))
    return LoadedModel(params, cfg, tok, None, None, str(path), "hf")


def _maybe_tokenizer(path: Path, tokenizer) -> Tokenizer | None:
    if tokenizer is False:
        return None
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        return HFTokenizer.from_pretrained(path)
    return None


def _parse_size(s: str | int | None) -> int | None:
    if s is None or isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", s, re.IGNORECASE)
    if not m:
        raise UserError(f"bad size {s!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    if unit not in mult:
        raise UserError(f"bad size unit in {s!r}")
    return int(float(m.group(1)) * mult[unit])


def _save_tokenizer_hf(tok: Tokenizer | None, directory: Path) -> None:
    if tok is None:
        return
    if isinstance(tok, ByteTokenizer):
        tok.to_hf().save_pretrained(str(directory))
    else:
        tok.save(directory)


def params_to_hf(
    directory: str | os.PathLike,
    params: dict,
    cfg: ModelConfig,
    tokenizer: Tokenizer | None = None,
    max_shard_size: str | int | None = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face directory (config.json, generation_config.json, model.safetensors or
    sharded ``model-0000i-of-0000n.safetensors`` + index, tokenizer files) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads with the same logits. Streams one
    layer of one tensor at a time; written atomically."""
    from transformers import GenerationConfig

    check_params(params, cfg, str(directory))
    hf_cfg = model_to_hf_config(cfg)
    entries = [(name, shape, dt, lambda get=get: [get()]) for name, shape, dt, get in _hf_tensors(params, cfg)]
    limit = _parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e[1]) * e[2].itemsize
        if limit and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    out = Path(directory)
    with atomic_directory(out, (), overwrite) as tmp:
        hf_cfg.save_pretrained(str(tmp))
        GenerationConfig(
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
        ).save_pretrained(str(tmp))
        _save_tokenizer_hf(tokenizer, tmp)
        meta = {"format": "pt"}
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", shards[0], meta)
        else:
            weight_map = {}
            total = 0
            for k, sh in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, sh, meta)
                for e in sh:
                    weight_map[e[0]] = fname
                    total += math.prod(e[1]) * e[2].itemsize
            idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.py``'s ``permute``)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class _GGUFStore:
    """GGUF tensors under their Hugging Face names and layout (dequantized to float32, q/k unpermuted)."""

    supports_slicing = False

    def __init__(self, path: Path, n_heads: int, n_kv_heads: int, reader):
        self.path = path
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.tensors = {}
        self.unknown = []
        for t in reader.tensors:
            hf = _gguf_to_hf_name(t.name)
            if hf is None:
                self.unknown.append(t.name)
            else:
                self.tensors[hf] = t

    def __contains__(self, name):
        return name in self.tensors

    def keys(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(int(s) for s in reversed(self.tensors[name].shape.tolist()))

    def dtype(self, name):
        return "F32"

    def read(self, name, index=None):
        from gguf import quants

        if name not in self.tensors:
            raise UserError(f"{self.path}: tensor `{name}` is missing")
        t = self.tensors[name]
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise UserError(f"{self.path}: cannot dequantize tensor `{t.name}` ({t.tensor_type.name}): {e}") from None
        w = w.reshape(self.shape(name))
        if name.endswith("q_proj.weight"):
            w = _unpermute_rotary(w, self.n_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rotary(w, self.n_kv_heads)
        return w if index is None else w[tuple(index)]


def _gguf_reader(path: Path):
    import gguf

    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a readable GGUF file (corrupt or truncated?): {e}") from None


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return default if v is None else v


def _gguf_config(reader, path: Path) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UserError(f"{path}: tensor `rope_freqs.weight` (Llama-3.1 rope scaling in GGUF) is not supported")
    scaling = _gguf_field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UserError(f"{path}: GGUF rope scaling {scaling!r} is not supported")

    def req(k):
        v = _gguf_field(reader, f"llama.{k}")
        if v is None:
            raise UserError(f"{path}: GGUF metadata key `llama.{k}` is missing")
        return v

    D, H = int(req("embedding_length")), int(req("attention.head_count"))
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = _gguf_field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = int(emb.shape[-1]) if emb is not None else len(_gguf_field(reader, "tokenizer.ggml.tokens", []))
    head_dim = _gguf_field(reader, "llama.attention.key_length") or _gguf_field(reader, "llama.rope.dimension_count")
    ids = {k: _gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return ModelConfig(
        name=path.stem,
        vocab_size=int(vocab),
        d_model=D,
        n_layers=int(req("block_count")),
        n_heads=H,
        n_kv_heads=int(_gguf_field(reader, "llama.attention.head_count_kv") or H),
        head_dim=int(head_dim or D // H),
        d_ff=int(req("feed_forward_length")),
        max_seq_len=int(_gguf_field(reader, "llama.context_length", 4096)),
        rope_theta=float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        bos_token_id=None if ids["bos"] is None else int(ids["bos"]),
        eos_token_id=None if ids["eos"] is None else int(ids["eos"]),
        pad_token_id=None if ids["padding"] is None else int(ids["padding"]),
    )


def gguf_to_params(
    path: str | os.PathLike, mesh=None, rules: Rules = DEFAULT_RULES, dtype=None
) -> tuple[dict, ModelConfig]:
    """``(params, cfg)`` from a llama-architecture GGUF file (dequantized; q/k permutation undone)."""
    m = load_gguf(path, mesh=mesh, rules=rules, dtype=dtype, tokenizer=False)
    return m.params, m.cfg


def load_gguf(path, mesh=None, rules: Rules = DEFAULT_RULES, dtype=None, tokenizer=None) -> LoadedModel:
    """A GGUF file as a LoadedModel; the tokenizer comes from the file (``AutoTokenizer(gguf_file=)``)."""
    path = Path(path)
    reader = _gguf_reader(path)
    cfg = _gguf_config(reader, path)
    pdt = jnp.dtype(dtype).name if dtype is not None else "float32"
    cfg = cfg.replace(param_dtype=pdt, dtype="float32" if pdt == "float32" else "bfloat16")
    store = _GGUFStore(path, cfg.n_heads, cfg.n_kv_heads, reader)
    if tokenizer is False:
        tok = None
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        tok = HFTokenizer.from_pretrained(path.parent, path.name)
    check_tokenizer_vocab(tok, cfg, str(path))
    params = read_hf_params(store, cfg, mesh, rules, where=str(path))
    return LoadedModel(params, cfg, tok, None, None, str(path), "gguf")


# ----------------------------------------------------------------------------- PEFT

_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\."
    r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_PEFT_TO_OURS = {v: k for k, v in PEFT_NAMES.items()}
_OURS_TO_TARGET = {v: k for k, v in TARGETS.items()}


def _peft_config(path: Path) -> dict:
    c = _read_json(path / "adapter_config.json")
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
    c = _peft_config(path)
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


def load_peft(path, base=None, mesh=None, rules: Rules = DEFAULT_RULES, dtype=None, tokenizer=None) -> LoadedModel:
    """A PEFT adapter dir on its base model (``base`` or ``base_model_name_or_path``), unmerged."""
    path = Path(path)
    c = _peft_config(path)
    if base is None:
        b = c.get("base_model_name_or_path")
        if not b:
            raise UserError(f"{path}: adapter_config.json names no base model; pass --base PATH")
        bp = Path(b)
        if not bp.is_absolute() and not bp.exists() and (path / bp).exists():
            bp = path / bp
        if not bp.exists():
            raise UserError(f"{path}: base model {b!r} (base_model_name_or_path) is not a local path; pass --base PATH")
        base = bp
    if any((path / f).is_file() for f in _TOKENIZER_FILES) and tokenizer is None:
        tokenizer = str(path)
    bm = load_model(base, mesh=mesh, rules=rules, dtype=dtype, tokenizer=tokenizer)
    if bm.lora is not None:
        raise UserError(f"base model {base} already carries LoRA adapters; merge them first (--merge-lora)")
    lora, lcfg = peft_to_lora(path, bm.cfg, mesh, rules)
    return LoadedModel(bm.params, bm.cfg, bm.tokenizer, lora, lcfg, str(path), "peft")


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
        _save_tokenizer_hf(tokenizer, tmp)
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None, prog: str = "w2s convert", command: str = "convert") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description="Convert checkpoints between Hugging Face, GGUF, PEFT and w2s-jax."
    )
    ap.add_argument("--from", dest="src", required=True, choices=["hf", "gguf", "native", "peft"])
    ap.add_argument("--input", required=True, help="model directory, .gguf file or PEFT adapter directory")
    ap.add_argument("--output", required=True, help="output directory (new, empty, or one w2s-jax wrote; written "
                    "under a temporary name and renamed into place)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --output even when it holds files w2s-jax did not write")
    ap.add_argument("--to", choices=["native", "hf", "peft"], default=None,
                    help="output format (default: hf when --from native, else native)")
    ap.add_argument("--base", default=None, help="base model of a PEFT adapter (default: its base_model_name_or_path); "
                    "with --to peft, the base path recorded in adapter_config.json")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    ap.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights (--to native)")
    ap.add_argument("--max-shard-size", default="5GB", help="--to hf: split model.safetensors above this size")
    ap.add_argument("--tokenizer", default=None, help="tokenizer spec/path overriding the model's own ('byte')")
    args = ap.parse_args(argv)
    to = args.to or ("hf" if args.src == "native" else "native")
    inp = Path(args.input)
    from w2s_jax.io.native import detect_format

    found = detect_format(inp)
    if found != args.src:
        raise UserError(f"--from {args.src}, but {inp} looks like a {found} checkpoint")
    from w2s_jax.core.paths import same_file
    from w2s_jax.io.native import META_FILE, check_output_dir

    out = Path(args.output)
    if same_file(out, inp) or inp.resolve() in out.resolve().parents or out.resolve() in inp.resolve().parents:
        raise UserError(f"--output {out} overlaps --input {inp}; choose another output directory")
    # before loading: refuse a directory w2s-jax did not write
    check_output_dir(out, (META_FILE,) if to == "native" else (), args.overwrite)
    m = load_model(inp, dtype=args.dtype, base=args.base, tokenizer=args.tokenizer)
    params, lora, lcfg = m.params, m.lora, m.lora_cfg
    if to == "peft":
        if lora is None:
            raise UserError(f"{inp} has no LoRA adapters to write as PEFT")
        base = args.base
        if base is None and args.src == "peft":
            base = _peft_config(inp).get("base_model_name_or_path")
        lora_to_peft(args.output, lora, lcfg, m.cfg, base_model_name_or_path=base, tokenizer=None,
                     overwrite=args.overwrite)
        print(f"wrote PEFT adapter ({lcfg.rank=}, targets {list(lcfg.targets)}) to {args.output}")
        return 0
    if lora is not None and (to == "hf" or args.merge_lora):
        if to == "hf" and not args.merge_lora:
            print("merging LoRA adapters into the base weights (use --to peft to export the adapter alone)")
        params = merge_lora(params, lora, m.cfg, lcfg.scale)
        lora = lcfg = None
    if to == "hf":
        params_to_hf(args.output, params, m.cfg, m.tokenizer, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite)
    else:
        save_model(args.output, params, m.cfg, m.tokenizer, lora=lora, lora_cfg=lcfg, overwrite=args.overwrite)
    n = sum(int(np.prod(x.shape)) for x in flatten_tree(params).values())
    print(f"wrote {to} model ({m.cfg.n_layers} layers, {n:,} parameters, {m.cfg.param_dtype}) to {args.output}")
    return 0
