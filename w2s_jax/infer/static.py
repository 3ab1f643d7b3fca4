"""The static engine's program: one batch of left-padded prompts, prefilled in one pass, then a
``lax.while_loop`` decoding one token per step until every row has finished. Its layers are
``models.decoder.layer``, with the prefill and decode attention modes.

- **One program per bucket.** Rows (prompt, sample) are sorted by prompt length and cut into batches
  of ``batch_size``; a batch is padded up to a *batch bucket* (default 1, 2, 4, ..., batch_size; with
  a mesh, multiples of the data-parallel size) and its prompts are LEFT-padded to a *prompt-length
  bucket* (default 16, 32, 64, ... up to ``max_prompt_len``). Each (batch bucket, prompt bucket,
  max_new_tokens, sampling mode) is compiled once (ahead of time; counted in
  :attr:`Sampler.num_compiled`, logged with its compile time), so a whole data set compiles a small,
  bounded number of programs.
- **Inside the program**: the prompt is prefilled in one pass (causal attention among the prompt
  tokens, per-row ``kv_start``: the first real slot; RoPE position = slot - kv_start), the last
  position's logits give the first token, then a ``lax.while_loop`` decodes one token per step and
  exits early once every row has finished. Nothing is synchronised with the host per step.
- **KV cache** ``[B, K, S, Dh]`` per layer, ``S = prompt bucket + max_new_tokens``, in the compute dtype,
  sharded with the logical names ``(batch, kv_heads, cache_length, head_dim)`` (batch over the data
  axes, kv heads over ``tensor``). It is created *inside* the program (the prefill's keys/values padded
  to ``S``), so it never crosses the host boundary and needs no donation: XLA owns the buffer and
  updates it in place (``dynamic_update_slice`` on the loop carry). A decode step attends over the old
  cache plus the new token's own key/value and writes that key/value afterwards, so the attention never
  reads the freshly written buffer; on CPU the program is compiled with XLA's region-based copy
  insertion, and the compiled loop body contains no copy of the cache (checked by a test).
- **One layer function**: prefill and decode run ``models.decoder.layer`` -- the layer training and
  scoring run -- with the prefill or decode attention mode of ``decoder.py``; only the attention and
  the weight form differ.
- **Layer loop**: on CPU and GPU the layers are unrolled over per-layer weight arrays (prepared once
  by ``models.prepare.prepare_weights`` when the Sampler is built; the Sampler then holds its own
  per-layer copy of the weights). A scan over stacked weights makes XLA:CPU copy every layer's
  weights each step, and on an H200 (Llama-2-7B, bfloat16, batch 1) it took 11.6 ms per decode step
  against 4.3 ms unrolled (64% of the HBM bound). In that copy q/k/v and gate/up are concatenated (one
  matmul each instead of three and two; LoRA terms are still added per kernel) unless a mesh axis
  shards heads or mlp, and tied embeddings get a ``[D, V]`` copy for the output projection (XLA:CPU's
  matrix-vector product is ~1.5x faster in that layout). On TPU (``layer_loop="scan"``) the stacked
  parameters are scanned as in ``decoder.forward``. Weights stay in their parameter dtype and are cast
  to the compute dtype inside the matmuls. The platform (the mesh's, else the first device's) picks
  these forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from w2s_jax.infer.sampling import (
    EOS,
    LENGTH,
    RUNNING,
    STOP,
    attention_kernel_for,
    head_logits,
    layer_proj,
    sample,
    skinny_for,
)
from w2s_jax.models import decoder as D
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.decoder import rms_norm
from w2s_jax.parallel.sharding import constrain


@dataclass(frozen=True)
class Spec:
    """Everything static about one compiled program."""

    cfg: ModelConfig
    batch: int
    prompt_len: int
    max_new: int
    greedy: bool
    top_k: int
    use_top_p: bool
    has_stop: bool
    eos_ids: tuple[int, ...]
    scan_layers: bool
    has_lora: bool
    return_logits: bool = False
    cpu_kernels: bool = False  # decode's small matmuls through cpu_kernels.skinny_matmul
    platform: str = "cpu"  # the mesh's platform (backend-specific layer forms)


CACHE_NAMES = ("batch", "kv_heads", "cache_length", "head_dim")


def _embed(spec, mesh, rules, weights, tok):
    return D.embed(spec.cfg, weights["embed"], tok, mesh, rules)


def _head(spec: Spec, weights, x_last, skinny):
    cfg = spec.cfg
    h = rms_norm(x_last, weights["final_norm"], cfg.norm_eps, cfg.norm_plus_one)
    return head_logits(cfg, weights, h, skinny)


def _prefill(spec: Spec, mesh, rules, weights, lora_layers, proj, tokens, kv_start):
    """The left-padded prompts through every layer; returns the last position's hidden state and the
    per-layer caches ``[B, K, P + N, Dh]`` (stacked over layers when scanned) holding the prompt."""
    cfg = spec.cfg
    dtype = jnp.dtype(cfg.dtype)
    P, N, window = tokens.shape[1], spec.max_new, cfg.sliding_window
    slots = jnp.arange(P, dtype=jnp.int32)
    positions = jnp.maximum(slots[None, :] - kv_start[:, None], 0)
    mask = (slots[None, :, None] >= slots[None, None, :]) & (slots[None, None, :] >= kv_start[:, None, None])
    if window is not None:
        mask &= (slots[None, :, None] - slots[None, None, :]) < window
    mask |= jnp.eye(P, dtype=bool)[None]  # padding queries see themselves (finite; never read)
    x = _embed(spec, mesh, rules, weights, tokens)
    rope = D.rotary(cfg, positions, dtype)
    pre = partial(D.layer, cfg, rope=rope, attend=D.prefill_attention(cfg, mask), proj=proj, mesh=mesh, rules=rules)

    def to_cache(kv):  # [B, P, K, Dh] -> [B, K, S, Dh]
        kv = jnp.pad(jnp.swapaxes(kv, 1, 2).astype(dtype), ((0, 0), (0, 0), (0, N), (0, 0)))
        return constrain(kv, CACHE_NAMES, mesh, rules)

    layers = weights["layers"]
    if spec.scan_layers:
        def scan_pre(x, xs):
            p, lp = xs
            x, (k, v) = pre(p, lp, x)
            return x, (to_cache(k), to_cache(v))

        x, (ck, cv) = jax.lax.scan(scan_pre, x, (layers, lora_layers))
        return x[:, -1], (ck, cv)
    caches = []
    for i in range(cfg.n_layers):
        x, (k, v) = pre(layers[i], None if lora_layers is None else lora_layers[i], x)
        caches.append((to_cache(k), to_cache(v)))
    return x[:, -1], caches


def _decode_step(spec: Spec, mesh, rules, weights, lora_layers, proj, x, rope, span, caches, slot):
    """One new token per row through every layer, attending to the cache slots ``span = (lo, hi)`` of
    its row; its keys/values are written at ``slot`` afterwards."""
    cfg = spec.cfg
    layers = weights["layers"]
    kernel = attention_kernel_for(spec)

    def dec(x, p, lp, ck, cv):
        attend = D.decode_attention(cfg, ck, cv, span, kernel=kernel)
        x, (k, v) = D.layer(cfg, p, lp, x, rope, attend, proj, mesh, rules)
        return x, k[:, 0].astype(ck.dtype), v[:, 0].astype(cv.dtype)

    if spec.scan_layers:
        ck_all, cv_all = caches

        def scan_dec(x, xs):
            x, k, v = dec(x, *xs)
            return x, (k, v)

        x, (k_new, v_new) = jax.lax.scan(scan_dec, x, (layers, lora_layers, ck_all, cv_all))
        ck_all = jax.lax.dynamic_update_slice(ck_all, k_new[:, :, :, None, :], (0, 0, 0, slot, 0))
        cv_all = jax.lax.dynamic_update_slice(cv_all, v_new[:, :, :, None, :], (0, 0, 0, slot, 0))
        return x, (ck_all, cv_all)
    new = []
    for li in range(cfg.n_layers):
        ck, cv = caches[li]
        x, k, v = dec(x, layers[li], None if lora_layers is None else lora_layers[li], ck, cv)
        ck = jax.lax.dynamic_update_slice(ck, k[:, :, None, :], (0, 0, slot, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[:, :, None, :], (0, 0, slot, 0))
        new.append((ck, cv))
    return x, new


def _update(spec: Spec, stop_table, i, tok, out, done, finish, ntok, sstate):
    """Record token ``i`` of every row and which rows it finished (EOS, stop string, length)."""
    eos = jnp.asarray(spec.eos_ids or (-1,), jnp.int32)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    live = ~done
    ntok = jnp.where(live, i + 1, ntok)
    reason = jnp.where(i + 1 >= spec.max_new, LENGTH, RUNNING)
    if spec.has_stop:
        sstate = jnp.where(live, stop_table[sstate, tok], sstate)
        reason = jnp.where(sstate == stop_table.shape[0] - 1, STOP, reason)
    reason = jnp.where(jnp.any(tok[:, None] == eos[None, :], axis=-1), EOS, reason)
    finish = jnp.where(live, reason, finish)
    done = done | (live & (reason != RUNNING))
    return out, done, finish, ntok, sstate


def program(spec: Spec, mesh, rules, weights, lora, lora_scale, tokens, kv_start, seeds, hashes, active,
            stop_table, temperature, top_p):
    """Prefill + decode loop. Returns (tokens [B, N], num_tokens [B], finish code [B]) and, with
    ``spec.return_logits``, the float32 logits each token was chosen from [B, N, V]."""
    cfg = spec.cfg
    B, P = tokens.shape
    N = spec.max_new
    keys = jax.vmap(lambda s, h: jax.random.fold_in(jax.random.key(s), h))(seeds, hashes)
    window = cfg.sliding_window
    lora_layers = None if lora is None else lora["layers"]
    skinny = skinny_for(spec)
    proj = layer_proj(spec, lora_scale, skinny)

    x_last, caches = _prefill(spec, mesh, rules, weights, lora_layers, proj, tokens, kv_start)
    logits = _head(spec, weights, x_last, skinny)
    tok = sample(spec, logits, keys, 0, temperature, top_p)
    lbuf = None
    if spec.return_logits:
        lbuf = jnp.zeros((B, N, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
    zeros = jnp.zeros((B,), jnp.int32)
    out, done, finish, ntok, sstate = _update(spec, stop_table, 0, tok, jnp.zeros((B, N), jnp.int32), ~active,
                                              zeros, zeros, zeros)

    def cond(c):
        i, done = c[0], c[4]
        return (i < N) & ~jnp.all(done)

    def body(c):
        i, tok, caches, out, done, finish, ntok, sstate, lbuf = c
        slot = P + i - 1
        # the slots read: [kv_start, slot), within the window; none for finished rows (output dropped)
        lo = kv_start if window is None else jnp.maximum(kv_start, slot - window + 1)
        span = (lo, jnp.where(done, lo, slot))
        x = _embed(spec, mesh, rules, weights, tok[:, None])
        rope = D.rotary(cfg, (slot - kv_start)[:, None], jnp.dtype(cfg.dtype))
        x, caches = _decode_step(spec, mesh, rules, weights, lora_layers, proj, x, rope, span, caches, slot)
        logits = _head(spec, weights, x[:, -1], skinny)
        tok = sample(spec, logits, keys, i, temperature, top_p)
        out, done, finish, ntok, sstate = _update(spec, stop_table, i, tok, out, done, finish, ntok, sstate)
        if lbuf is not None:
            lbuf = jax.lax.dynamic_update_slice(lbuf, logits[:, None], (0, i, 0))
        return i + 1, tok, caches, out, done, finish, ntok, sstate, lbuf

    init = (jnp.int32(1), tok, caches, out, done, finish, ntok, sstate, lbuf)
    _, _, _, out, _, finish, ntok, _, lbuf = jax.lax.while_loop(cond, body, init)
    if spec.return_logits:
        return out, ntok, finish, lbuf
    return out, ntok, finish
