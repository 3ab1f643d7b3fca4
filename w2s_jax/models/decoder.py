"""The decoder of the Llama family (Llama 2/3, Mistral, Gemma, SmolLM2) as pure functions.

Parameters are a nested dict of arrays; ``param_axes(cfg)`` gives the matching tree of logical
axis names (see ``sharding.py``). Layers are stacked on a leading ``layers`` axis and run with
``jax.lax.scan``, so compile time does not grow with depth; each layer body is wrapped in
``jax.checkpoint`` with the configured rematerialisation policy.

Weight layout (x @ W per layer, stacked over a leading layer axis) and logical axis names: ``params.py``.

LoRA adapters (``lora.py``) are a second tree ``{"layers": {name: {"a": [L, in..., r], "b": [L, r, out...]}}}``
applied unmerged inside the same einsums.

One layer function (:func:`layer`) serves every path: training and scoring (:func:`forward`), and
the prefill and decode programs of generation (``infer/sampler.py``, ``infer/engine.py``). What
differs is passed in: the attention (:func:`causal_attention` with ``segment_ids`` masks for
training/scoring; :func:`prefill_attention` over a padded prompt, optionally behind a shared
prefix; :func:`decode_attention` of one new token against a KV cache ``[B, K, S, Dh]`` per layer,
optionally plus a shared prefix) and the weight form (:class:`Proj`: the stacked parameters as above,
or the per-layer matrices of ``prepare.py`` with fused q/k/v and gate/up and an optional native
matmul). Backend-specific choices follow the platform of the mesh (:func:`platform_of`), not JAX's
default backend, so a program traced for a TPU mesh on a CPU host is the TPU program.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from w2s_jax.core.errors import UserError
from w2s_jax.models import prepare
from w2s_jax.models.config import ModelConfig
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, constrain

log = logging.getLogger(__name__)

# JAX's rematerialisation policy for each name of config.REMAT_POLICIES
CHECKPOINT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ----------------------------------------------------------------------------- layers


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:  # Gemma: scale in float32, then cast
        return (xf * (1.0 + w.astype(jnp.float32))).astype(dtype)
    return w.astype(dtype) * xf.astype(dtype)  # Llama: cast, then scale


def embed(cfg: ModelConfig, table: jax.Array, tokens: jax.Array, mesh=None, rules: Rules = DEFAULT_RULES):
    """Token embeddings ``[B, T, D]`` in the compute dtype (Gemma: times ``sqrt(d_model)``)."""
    dtype = jnp.dtype(cfg.dtype)
    x = table.astype(dtype)[tokens]
    if cfg.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)
    return constrain(x, ("batch", "length", "embed"), mesh, rules)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    dh = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    if cfg.rope_scaling == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_pos
        low_wl, high_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = jnp.where(medium, smoothed, scaled)
    elif cfg.rope_scaling is not None:
        raise ValueError(f"unsupported rope_scaling {cfg.rope_scaling!r}")
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [B, T, N, Dh]; positions [B, T]. Rotate-half convention (Hugging Face layout)."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :].astype(x.dtype)
    return _rope(x, cos, sin)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], -1) * sin


# einsum specs: (base, lora-in, lora-out)
_EINSUM = {
    "wq": ("btd,dhk->bthk", "btd,dr->btr", "btr,rhk->bthk"),
    "wk": ("btd,dhk->bthk", "btd,dr->btr", "btr,rhk->bthk"),
    "wv": ("btd,dhk->bthk", "btd,dr->btr", "btr,rhk->bthk"),
    "wo": ("bthk,hkd->btd", "bthk,hkr->btr", "btr,rd->btd"),
    "w_gate": ("btd,df->btf", "btd,dr->btr", "btr,rf->btf"),
    "w_up": ("btd,df->btf", "btd,dr->btr", "btr,rf->btf"),
    "w_down": ("btf,fd->btd", "btf,fr->btr", "btr,rd->btd"),
}


def platform_of(mesh=None, platform: str | None = None) -> str:
    """The platform programs are built for: the mesh's devices', else ``platform``, else the first
    device's (``cpu``, ``gpu``/``cuda``, ``tpu``)."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return platform or jax.devices()[0].platform


def _flat_dots(platform: str) -> bool:
    """Whether projections run as 2-D matmuls ``[B*T, in] @ [in, out]``. On XLA:CPU the einsum form
    makes the backward pass transpose 3-D activations for the weight gradients with a slow strided
    copy; the 2-D form uses the fast transpose and made the SmolLM2-shape SFT step ~20% faster.
    Elsewhere (GPU/TPU, sharded sequence axes) the einsum keeps every logical axis visible."""
    return platform == "cpu"


def _flat_dot(x, w, n_in: int, out_dtype=None):
    """``x [..., *in] @ w [*in, *out]`` as one 2-D matmul (``n_in`` contracted trailing dims of x)."""
    lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(*lead, *w.shape[n_in:])


def _dense(name, x, p, lora_p, lora_scale, dropout_key, lora_dropout, flat: bool):
    w = p[name].astype(x.dtype)
    n_in = 2 if name == "wo" else 1
    y = _flat_dot(x, w, n_in) if flat else jnp.einsum(_EINSUM[name][0], x, w)
    if lora_p is not None and name in lora_p:
        xin = x
        if dropout_key is not None and lora_dropout > 0:
            k = jax.random.fold_in(dropout_key, list(_EINSUM).index(name))
            keep = jax.random.bernoulli(k, 1.0 - lora_dropout, x.shape)
            xin = jnp.where(keep, x / (1.0 - lora_dropout), 0).astype(x.dtype)
        a, b = lora_p[name]["a"].astype(x.dtype), lora_p[name]["b"].astype(x.dtype)
        if flat:
            y = y + lora_scale * _flat_dot(_flat_dot(xin, a, n_in), b, 1)
        else:
            h = jnp.einsum(_EINSUM[name][1], xin, a)
            y = y + lora_scale * jnp.einsum(_EINSUM[name][2], h, b)
    return y


def _attention_mask(q_slots, k_slots, q_seg, k_seg, k_valid, window):
    """Boolean [B, T, S]: causal by slot, same segment, key valid, optional sliding window."""
    m = k_slots[:, None, :] <= q_slots[:, :, None]
    m &= q_seg[:, :, None] == k_seg[:, None, :]
    m &= k_valid[:, None, :]
    if window is not None:
        m &= (q_slots[:, :, None] - k_slots[:, None, :]) < window
    return m


def self_attention_mask(cfg: ModelConfig, segment_ids: jax.Array) -> jax.Array:
    """The training/scoring mask ``[B, T, T]`` of a (packed) sequence: causal, within a segment, the
    config's sliding window; padding (segment 0) queries attend to themselves only (keeps the softmax
    finite; their outputs are ignored)."""
    B, T = segment_ids.shape
    slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = _attention_mask(slots, slots, segment_ids, segment_ids, segment_ids > 0, cfg.sliding_window)
    return mask | jnp.eye(T, dtype=bool)[None]


def attention_implementation(cfg: ModelConfig, platform: str | None = None) -> str:
    """``xla`` or ``cudnn`` for the training/scoring attention. ``auto`` picks cuDNN's fused attention
    (``jax.nn.dot_product_attention(implementation="cudnn")``) on GPUs with a bfloat16/float16 compute
    dtype and head_dim <= 128, XLA's elsewhere. Measured on an H200 (Llama-2-7B shape cut to 8 layers,
    8 x 1024 tokens, bfloat16): the full SFT step took 174 to 178 ms with cuDNN against 213 ms with
    XLA's attention."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    if platform_of(None, platform) in ("gpu", "cuda") and cfg.dtype in ("bfloat16", "float16") and cfg.head_dim <= 128:
        return "cudnn"
    return "xla"


def _attend(cfg: ModelConfig, q, k, v, mask, platform: str):
    """Causal attention ``[B, T, H, D]`` over keys/values ``[B, T, KV, D]`` with a boolean mask [B, T, T]
    that allows no key after its query (training and scoring). On CPU it uses
    :func:`_grouped_causal_attention`; elsewhere ``jax.nn``'s attention (cuDNN's when chosen)."""
    impl = attention_implementation(cfg, platform)
    if impl == "cudnn":
        try:  # JAX checks cuDNN's availability and limits while tracing
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="cudnn")
        except (RuntimeError, NotImplementedError, ValueError) as e:
            if cfg.attention_impl == "cudnn":
                raise UserError(f"attention_impl='cudnn' is not available for this model/device ({e}); set the "
                                "model override attention_impl to 'xla' (or 'auto')") from e
            _warn_once(f"cuDNN attention is not available here ({e}); using XLA's attention "
                       "(attention_impl='xla' silences this)")
            impl = "xla"
    if impl == "xla" and _flat_dots(platform):
        return _grouped_causal_attention(q, k, v, mask, blocks=2 if q.shape[1] % 2 == 0 and q.shape[1] >= 128 else 1)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])


@functools.cache
def _warn_once(msg: str) -> None:
    log.warning(msg)


def _grouped_causal_attention(q, k, v, mask, blocks: int):
    """Causal attention for XLA:CPU with every [.., T, S]-sized tensor in one layout.

    Queries are laid out ``[B, KV, T*G, D]`` (the G query heads sharing a key/value head next to
    each other per position), so the score/probability tensors ``[B, KV, T, G, S]`` need no
    transposes between the dots and the softmax, and the mask [B, T, S] broadcasts over KV and G.
    The queries are split into ``blocks`` row blocks; block i only attends to keys ``< (i+1)*T/blocks``
    (the rest is masked by causality), which skips 1/4 of the work for 2 blocks. Measured on the
    2-core EPYC, SmolLM2-135M shape, fp32 SFT step: 5.19 s against 5.42 s with
    ``jax.nn.dot_product_attention`` (same process, medians of 4)."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    qb = T // blocks
    qg = (q * jnp.asarray(D ** -0.5, q.dtype)).reshape(B, T, KV, G, D).transpose(0, 2, 1, 3, 4)
    qg = qg.reshape(B, KV, T * G, D)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    outs = []
    for i in range(blocks):
        lo, hi = i * qb, (i + 1) * qb
        s = jnp.einsum("bkqd,bksd->bkqs", qg[:, :, lo * G:hi * G], kt[:, :, :hi],
                       preferred_element_type=jnp.float32).reshape(B, KV, qb, G, hi)
        s = jnp.where(mask[:, None, lo:hi, None, :hi], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype).reshape(B, KV, qb * G, hi)
        outs.append(jnp.einsum("bkqs,bksd->bkqd", p, vt[:, :, :hi]).reshape(B, KV, qb, G, D))
    o = jnp.concatenate(outs, 2) if blocks > 1 else outs[0]
    return o.transpose(0, 2, 1, 3, 4).reshape(B, T, H, D)



# ----------------------------------------------------------------------------- the layer


@dataclass(frozen=True)
class Proj:
    """How a layer applies its weights. Stacked-parameter layers (``wq`` ... ``w_down``) run as einsums,
    or as 2-D matmuls when ``flat`` (:func:`_flat_dots`); LoRA adapters are added unmerged with
    ``lora_scale``, with inverted dropout on their inputs when ``dropout_key`` is set. Prepared layers
    (``prepare.prepare_layer``: ``[in, out]`` matrices, q/k/v and gate/up possibly fused and cut into
    column chunks) run through ``prepare.matmul`` with the optional native kernel ``skinny``."""

    lora_scale: Any = 1.0
    flat: bool = False
    lora_dropout: float = 0.0
    dropout_key: Any = None
    skinny: Callable | None = None

    def dense(self, name, x, p, lp):
        return _dense(name, x, p, lp, self.lora_scale, self.dropout_key, self.lora_dropout, self.flat)

    def lora(self, y, name, x, lp):
        """``y`` plus the unmerged LoRA term of kernel ``name`` (prepared layers; no dropout)."""
        if lp is None or name not in lp:
            return y
        h = jnp.einsum(_EINSUM[name][1], x, lp[name]["a"].astype(x.dtype))
        return y + self.lora_scale * jnp.einsum(_EINSUM[name][2], h, lp[name]["b"].astype(x.dtype))

    def mm(self, x, w, out_dtype=None):
        return prepare.matmul(x, w, out_dtype, self.skinny)


def rotary(cfg: ModelConfig, positions: jax.Array, dtype) -> Callable:
    """RoPE for ``positions [B, T]`` with the ``cos, sin`` tables ``[B, T, 1, Dh]`` computed once (the
    values :func:`apply_rope` uses): a function ``x [B, T, N, Dh] -> rotated x``, for :func:`layer`."""
    ang = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)  # [B, T, Dh/2]
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    return partial(_rope, cos=jnp.cos(ang).astype(dtype), sin=jnp.sin(ang).astype(dtype))


def _qkv(cfg: ModelConfig, p, lp, h, proj: Proj):
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if "o" not in p:  # stacked parameters
        return proj.dense("wq", h, p, lp), proj.dense("wk", h, p, lp), proj.dense("wv", h, p, lp)
    B, T = h.shape[:2]
    if "qkv" in p:
        y = proj.mm(h, p["qkv"])
        q, k, v = y[..., : H * Dh], y[..., H * Dh: (H + K) * Dh], y[..., (H + K) * Dh:]
    else:
        q, k, v = proj.mm(h, p["q"]), proj.mm(h, p["k"]), proj.mm(h, p["v"])
    q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
    return proj.lora(q, "wq", h, lp), proj.lora(k, "wk", h, lp), proj.lora(v, "wv", h, lp)


def _gate_up(cfg: ModelConfig, p, lp, h, proj: Proj):
    if "o" not in p:
        return proj.dense("w_gate", h, p, lp), proj.dense("w_up", h, p, lp)
    if "gu" in p:
        gu = proj.mm(h, p["gu"])
        g, u = gu[..., : cfg.d_ff], gu[..., cfg.d_ff:]
    else:
        g, u = proj.mm(h, p["gate"]), proj.mm(h, p["up"])
    return proj.lora(g, "w_gate", h, lp), proj.lora(u, "w_up", h, lp)


def _out(p, lp, attn, proj: Proj):
    if "o" not in p:
        return proj.dense("wo", attn, p, lp)
    return proj.lora(proj.mm(attn.reshape(*attn.shape[:2], -1), p["o"]), "wo", attn, lp)


def _down(p, lp, gu, proj: Proj):
    if "o" not in p:
        return proj.dense("w_down", gu, p, lp)
    return proj.lora(proj.mm(gu, p["down"]), "w_down", gu, lp)


def attention_block(cfg: ModelConfig, p: dict, lp: dict | None, h, rope: Callable, attend: Callable, proj: Proj,
                    mesh=None, rules: Rules = DEFAULT_RULES):
    """Self-attention of the normed input ``h``: q/k/v projections, RoPE on q and k, ``attend(q, k, v)``
    and the output projection. Returns the attention output ``[B, T, D]`` (before the residual) and the
    new keys/values ``[B, T, K, Dh]`` (after RoPE)."""
    q, k, v = _qkv(cfg, p, lp, h, proj)
    q, k = rope(q), rope(k)
    q = constrain(q, ("batch", "length", "heads", "head_dim"), mesh, rules)
    return _out(p, lp, attend(q, k, v), proj), (k, v)


def mlp_block(cfg: ModelConfig, p: dict, lp: dict | None, h, proj: Proj, mesh=None, rules: Rules = DEFAULT_RULES):
    """The gated MLP of the normed input ``h``: ``down(act(gate(h)) * up(h))`` (SiLU, or tanh-GELU for Gemma)."""
    g, u = _gate_up(cfg, p, lp, h, proj)
    g = jax.nn.silu(g) if cfg.activation == "silu" else jax.nn.gelu(g, approximate=True)
    gu = constrain(g * u, ("batch", "length", "mlp"), mesh, rules)
    return _down(p, lp, gu, proj)


def layer(cfg: ModelConfig, p: dict, lp: dict | None, x, rope: Callable, attend: Callable, proj: Proj, mesh=None,
          rules: Rules = DEFAULT_RULES):
    """One decoder layer: norm -> :func:`attention_block` -> residual -> norm -> :func:`mlp_block` ->
    residual. ``p``/``lp``: this layer's weights and LoRA adapters; ``rope``: applies RoPE to q and k
    (:func:`rotary`, or :func:`apply_rope` at given positions). Returns ``x`` and the layer's new
    keys/values ``[B, T, K, Dh]`` (after RoPE), which a generation caller writes into its cache."""
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps, cfg.norm_plus_one)
    attn, kv = attention_block(cfg, p, lp, h, rope, attend, proj, mesh, rules)
    x = constrain(x + attn, ("batch", "length", "embed"), mesh, rules)
    h = rms_norm(x, p["mlp_norm"], cfg.norm_eps, cfg.norm_plus_one)
    x = constrain(x + mlp_block(cfg, p, lp, h, proj, mesh, rules), ("batch", "length", "embed"), mesh, rules)
    return x, kv


# ----------------------------------------------------------------------------- attention modes


def causal_attention(cfg: ModelConfig, mask, platform: str, mesh=None, rules: Rules = DEFAULT_RULES):
    """Training and scoring: the sequence attends to itself under ``mask [B, T, T]`` (causal, per segment)."""
    def attend(q, k, v):
        k = constrain(k, ("batch", "cache_length", "kv_heads", "head_dim"), mesh, rules)
        v = constrain(v, ("batch", "cache_length", "kv_heads", "head_dim"), mesh, rules)
        return _attend(cfg, q, k, v, mask, platform)

    return attend


def prefill_attention(cfg: ModelConfig, mask, prefix=None):
    """A padded prompt ``[B, P]`` attends to itself, behind the shared ``prefix`` keys/values
    ``([K, Sp, Dh], [K, Sp, Dh])`` when given; ``mask [B, P, Sp + P]``. cuDNN only when asked for by
    name: ``auto`` keeps XLA's attention here (left-padded prompts mask whole rows)."""
    def attend(q, k, v):
        if prefix is not None:
            R, Sp = q.shape[0], prefix[0].shape[1]
            pk, pv = (jnp.broadcast_to(jnp.swapaxes(a, 0, 1)[None].astype(b.dtype), (R, Sp, *b.shape[2:]))
                      for a, b in zip(prefix, (k, v)))
            k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], implementation="cudnn" if cfg.attention_impl == "cudnn" else None)

    return attend


def decode_attention(cfg: ModelConfig, ck, cv, span, prefix=None, prefix_valid=None, kernel: Callable | None = None):
    """One new token per row attends to the slots ``span = (lo, hi)`` (``[lo[b], hi[b])``, int32 ``[B]``
    each) of the row's OLD cache ``ck/cv [B, K, S, Dh]``, to itself, and to the shared ``prefix``
    ``([K, Sp, Dh], [K, Sp, Dh])`` (slots ``prefix_valid [B, Sp]``) when given. The cache is only read:
    the caller writes the new key/value afterwards, so XLA can update the cache in place.

    ``kernel(q, ck, cv, lo, hi)`` (optional; the native CPU kernel of ``infer/kernels.py``) computes the
    cache part over those slots only and returns softmax partials ``(o, m, l)``, or None when it does
    not apply; then the masked einsums run over the whole cache."""
    def attend(q, k, v):
        B, H, K, Dh = q.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        k, v = k[:, 0].astype(ck.dtype), v[:, 0].astype(cv.dtype)  # [B, K, Dh]
        qg = (q[:, 0] * jnp.asarray(1.0 / math.sqrt(Dh), q.dtype)).reshape(B, K, H // K, Dh).astype(ck.dtype)
        part = None if kernel is None else kernel(qg, ck, cv, *span)
        s_self = jnp.einsum("bkgd,bkd->bkg", qg, k, preferred_element_type=jnp.float32)
        if part is None:
            kslots = jnp.arange(ck.shape[2], dtype=jnp.int32)
            valid = (kslots[None, :] >= span[0][:, None]) & (kslots[None, :] < span[1][:, None])
            s = jnp.einsum("bkgd,bksd->bkgs", qg, ck, preferred_element_type=jnp.float32)
            s = jnp.where(valid[:, None, None, :], s, -1e30)
            m = jnp.maximum(jnp.max(s, axis=-1), s_self)
        else:
            o_c, m_c, l_c = part
            m = jnp.maximum(m_c, s_self)
        if prefix is not None:
            sp = jnp.einsum("bkgd,ksd->bkgs", qg, prefix[0].astype(ck.dtype), preferred_element_type=jnp.float32)
            sp = jnp.where(prefix_valid[:, None, None, :], sp, -1e30)
            m = jnp.maximum(m, jnp.max(sp, axis=-1))
        e_self = jnp.exp(s_self - m)
        if part is None:
            e = jnp.exp(s - m[..., None])
            den = jnp.sum(e, axis=-1) + e_self
            o = jnp.einsum("bkgs,bksd->bkgd", e.astype(cv.dtype), cv, preferred_element_type=jnp.float32)
        else:
            a = jnp.exp(m_c - m)
            den = l_c * a + e_self
            o = o_c * a[..., None]
        o = o + e_self[..., None] * v[:, :, None, :].astype(jnp.float32)
        if prefix is not None:
            ep = jnp.exp(sp - m[..., None])
            den = den + jnp.sum(ep, axis=-1)
            o = o + jnp.einsum("bkgs,ksd->bkgd", ep.astype(cv.dtype), prefix[1].astype(cv.dtype),
                               preferred_element_type=jnp.float32)
        return (o / den[..., None]).reshape(B, 1, H, Dh).astype(q.dtype)

    return attend


# ----------------------------------------------------------------------------- the model


def _scan_layer(cfg, mesh, rules, platform, lora_scale, lora_dropout, carry, xs):
    x, mask, positions, dropout_key = carry
    p, lp, layer_idx = xs
    dk = None if dropout_key is None else jax.random.fold_in(dropout_key, layer_idx)
    proj = Proj(lora_scale, _flat_dots(platform), lora_dropout, dk)
    rope = partial(apply_rope, positions=positions, inv_freq=rope_frequencies(cfg))
    x, _ = layer(cfg, p, lp, x, rope, causal_attention(cfg, mask, platform, mesh, rules), proj, mesh, rules)
    return (x, mask, positions, dropout_key), None


def forward(
    params: dict,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    lora: dict | None = None,
    lora_scale: float = 1.0,
    lora_dropout: float = 0.0,
    dropout_key: jax.Array | None = None,
    mesh=None,
    rules: Rules = DEFAULT_RULES,
    return_hidden: bool = False,
    platform: str | None = None,
):
    """Logits ``[B, T, V]`` (float32) for training and scoring (generation runs the same
    :func:`layer` in ``infer/``). ``segment_ids`` [B, T] (default all ones; 0 marks padding) and
    ``positions`` (default 0..T-1; restart per packed segment). ``platform``: see :func:`platform_of`.
    """
    B, T = tokens.shape
    dtype = jnp.dtype(cfg.dtype)
    platform = platform_of(mesh, platform)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    mask = self_attention_mask(cfg, segment_ids)

    x = embed(cfg, params["embed"], tokens, mesh, rules)

    body = partial(_scan_layer, cfg, mesh, rules, platform, lora_scale, lora_dropout)
    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=CHECKPOINT_POLICIES[cfg.remat], prevent_cse=False)
    lp = None if lora is None else lora["layers"]
    xs = (params["layers"], lp, jnp.arange(cfg.n_layers))
    (x, *_), _ = jax.lax.scan(body, (x, mask, positions, dropout_key), xs)

    x = rms_norm(x, params["final_norm"], cfg.norm_eps, cfg.norm_plus_one)
    if return_hidden:
        return x
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    if _flat_dots(platform):
        logits = _flat_dot(x, head.astype(dtype), 1, jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", x, head.astype(dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"), mesh, rules)
