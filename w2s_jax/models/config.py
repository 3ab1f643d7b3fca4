"""Model shapes: :class:`ModelConfig` and the published presets of the Llama family."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from w2s_jax.core.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 16
    d_ff: int = 128
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    # Llama-3 style rope scaling ("llama3") or None
    rope_scaling: str | None = None
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    norm_eps: float = 1e-5
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    tie_embeddings: bool = False
    scale_embeddings: bool = False  # Gemma: embeddings * sqrt(d_model)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
    sliding_window: int | None = None  # Mistral
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat: str = "none"  # none | full | dots | dots_no_batch
    attention_impl: str = "auto"  # auto | xla | cudnn (see attention_implementation)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; valid: {sorted(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; valid: {', '.join(ATTENTION_IMPLS)}")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        D, F, L, V = self.d_model, self.d_ff, self.n_layers, self.vocab_size
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        per_layer = D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F + 2 * D
        return V * D * (1 if self.tie_embeddings else 2) + L * per_layer + D

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6N plus attention), as in the PaLM/MaxText accounting."""
        attn = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len / 2  # causal half
        return 6.0 * self.num_params + attn


# rematerialisation policies by name (decoder.CHECKPOINT_POLICIES maps each to JAX's policy)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")

# Published shapes. vocab/special ids follow each family's tokenizer.
PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig("llama2-7b", 32000, 4096, 32, 32, 32, 128, 11008, 4096),
    "llama2-13b": ModelConfig("llama2-13b", 32000, 5120, 40, 40, 40, 128, 13824, 4096),
    "llama2-70b": ModelConfig("llama2-70b", 32000, 8192, 80, 64, 8, 128, 28672, 4096),
    "mistral-7b": ModelConfig(
        "mistral-7b", 32000, 4096, 32, 32, 8, 128, 14336, 32768, rope_theta=1e6, sliding_window=4096
    ),
    "gemma-2b": ModelConfig(
        "gemma-2b", 256000, 2048, 18, 8, 1, 256, 16384, 8192, norm_eps=1e-6, activation="gelu_tanh",
        tie_embeddings=True, scale_embeddings=True, norm_plus_one=True, bos_token_id=2, eos_token_id=1,
        pad_token_id=0,
    ),
    "llama3-8b": ModelConfig(
        "llama3-8b", 128256, 4096, 32, 32, 8, 128, 14336, 8192, rope_theta=500000.0, rope_scaling="llama3",
        norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, pad_token_id=None,
    ),
    "llama3-70b": ModelConfig(
        "llama3-70b", 128256, 8192, 80, 64, 8, 128, 28672, 8192, rope_theta=500000.0, rope_scaling="llama3",
        bos_token_id=128000, eos_token_id=128001, pad_token_id=None,
    ),
    "smollm2-135m": ModelConfig(
        "smollm2-135m", 49152, 576, 30, 9, 3, 64, 1536, 8192, rope_theta=100000.0, tie_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ),
    "tiny": ModelConfig("tiny"),
    "tiny-gqa": ModelConfig("tiny-gqa", 256, 64, 2, 4, 2, 16, 128, 512),
    "tiny-mqa": ModelConfig("tiny-mqa", 256, 64, 2, 4, 1, 16, 128, 512),
    "tiny-gemma": ModelConfig(
        "tiny-gemma", 256, 64, 2, 4, 1, 32, 128, 512, norm_eps=1e-6, activation="gelu_tanh",
        tie_embeddings=True, scale_embeddings=True, norm_plus_one=True,
    ),
    "tiny-mistral": ModelConfig("tiny-mistral", 256, 64, 2, 4, 2, 16, 128, 512, sliding_window=8),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise UserError(f"unknown model preset `{name}`{hint}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


