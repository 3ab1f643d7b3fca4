"""GGUF checkpoints (llama architecture) -> w2s-jax parameters.

GGUF (llama architecture, e.g. SmolLM2): tensors are dequantized with ``gguf.quants.dequantize``;
llama.cpp permutes the rows of ``attn_q``/``attn_k`` (interleaved rotary pairs), which is undone
exactly as transformers' ``LlamaTensorProcessor._reverse_permute_weights`` does; the result is then
read with the Hugging Face mapping above.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.io.hf import read_hf_params
from w2s_jax.io.modeldir import LoadedModel, check_tokenizer_vocab
from w2s_jax.io.tokenizer import HFTokenizer, load_tokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules

__all__ = ["gguf_to_params", "load_gguf"]


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
