"""Hugging Face checkpoints <-> w2s-jax parameters: ``config.json`` and safetensors, read and written.

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
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.io.modeldir import LoadedModel, atomic_directory, check_params, check_tokenizer_vocab, read_json
from w2s_jax.io.tensor_files import (
    FLOAT_CODES,
    ST_NAMES,
    SafetensorsStore,
    flatten_tree,
    materialize,
    shardings_for,
    unflatten_tree,
    write_safetensors,
)
from w2s_jax.io.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.params import param_axes, param_shapes
from w2s_jax.parallel.distributed import to_host
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules

__all__ = ["SUPPORTED_HF", "TOKENIZER_FILES", "hf_config_to_model", "model_to_hf_config", "read_hf_params",
           "hf_to_params", "load_hf", "params_to_hf", "params_to_state_dict", "state_dict_to_params",
           "save_tokenizer_hf"]


SUPPORTED_HF = ("llama", "mistral", "gemma")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


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
        return ST_NAMES.get(dt, dt.name)

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


def _default_dtype(code: str) -> str:
    return {"BF16": "bfloat16", "F16": "float16"}.get(code, "float32")


def hf_to_params(
    path: str | os.PathLike, mesh=None, rules: Rules = DEFAULT_RULES, dtype=None
) -> tuple[dict, ModelConfig]:
    """``(params, cfg)`` from a Hugging Face safetensors directory (streamed, see ``io/native.py``)."""
    m = load_hf(path, mesh=mesh, rules=rules, dtype=dtype, tokenizer=False)
    return m.params, m.cfg


def load_hf(path, mesh=None, rules: Rules = DEFAULT_RULES, dtype=None, tokenizer=None) -> LoadedModel:
    """A Hugging Face directory as a LoadedModel. ``tokenizer=False`` skips the tokenizer."""
    path = Path(path)
    c = read_json(path / "config.json")
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
    if any((path / f).is_file() for f in TOKENIZER_FILES):
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


def save_tokenizer_hf(tok: Tokenizer | None, directory: Path) -> None:
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
        save_tokenizer_hf(tokenizer, tmp)
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
