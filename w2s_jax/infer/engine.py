"""Continuous-batching generation with shared-prefix prefill: the engine behind :class:`Sampler`.

This module holds the engine's device programs (prefill, insert, decode) and their state; the host loop
that queues requests and refills slots is :mod:`w2s_jax.infer.scheduler`. See ``docs/generation.md``
for the design and the measured speed-ups. In short:

- **Shared prefix.** The longest token prefix common to every prompt of a ``stream`` call (the
  few-shot demonstrations in front of each question), when it is at least ``scheduler.MIN_PREFIX``
  tokens, is prefilled once (cached on the Sampler by its token ids) into a ``[K, Sp, Dh]`` per-layer cache
  without a batch axis; every prompt prefills only its own suffix on top of it, and every decode
  step attends to that one copy (a matrix product for all rows at once) plus its own slot cache.
- **n samples of one prompt** prefill the prompt once; its keys/values are copied into n decode slots.
- **Continuous batching.** ``slots`` decode slots, each with its own ``[K, Ss, Dh]`` cache
  (``Ss = suffix bucket + max_new_tokens``), filled from position 0 (right-padded; no left padding).
  A compiled ``lax.while_loop`` decodes until ``max(1, slots // 8)`` rows have finished while
  requests are waiting (or all rows finish); the host then harvests the finished rows and inserts
  the next requests into their slots (prefill program, then an insert program that copies the
  prefilled rows into the free slots and samples their first token), JetStream-style. The decode
  state is donated between the programs, so the caches are updated in place.
- **Static shapes.** Prefill shapes are bucketed (rows: 1, 2, 4, ...; suffix length: the prompt
  buckets), the decode program has one shape per call, so a run compiles a small, bounded number of
  programs (counted in ``Sampler.num_compiled``).
- **Sampling keys** are those of the static path: sample ``j`` of a prompt uses
  ``fold_in(key(seed + j), crc32(prompt ids))`` and token ``t`` folds in ``t``; nothing depends on the
  slot a row lands in or on the other rows.
"""

from __future__ import annotations

import dataclasses
import logging
import time
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
    sample_rows,
    skinny_for,
)
from w2s_jax.models import decoder as D
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.decoder import rms_norm
from w2s_jax.parallel.sharding import constrain, named_sharding

log = logging.getLogger("w2s_jax.infer.sampler")

CACHE_NAMES = ("batch", "kv_heads", "cache_length", "head_dim")
PREFIX_NAMES = ("kv_heads", "cache_length", "head_dim")


@dataclass(frozen=True)
class _ESpec:
    """Everything static about the engine's programs."""

    cfg: ModelConfig
    slots: int  # decode slots B
    cache_len: int  # per-slot cache length Ss
    max_new: int
    prefix_len: int  # prefix bucket (0: no shared prefix)
    greedy: bool
    top_k: int
    use_top_p: bool
    has_stop: bool
    eos_ids: tuple[int, ...]
    scan_layers: bool
    has_lora: bool
    cpu_kernels: bool = False
    platform: str = "cpu"  # the mesh's platform (backend-specific layer forms)
    return_logits: bool = False  # keep the float32 logits each token was drawn from (state["logits"])


# ----------------------------------------------------------------------------- pieces


def _embed(spec, mesh, rules, weights, tok):
    return D.embed(spec.cfg, weights["embed"], tok, mesh, rules)


def _head(spec, weights, x_last, skinny=None):
    cfg = spec.cfg
    h = rms_norm(x_last, weights["final_norm"], cfg.norm_eps, cfg.norm_plus_one)
    return head_logits(cfg, weights, h, skinny)


def _keys(seeds, hashes):
    return jax.vmap(lambda s, h: jax.random.fold_in(jax.random.key(s), h))(seeds, hashes)


def _sample_rows(spec, logits, keys, steps, temperature, top_p):
    return sample_rows(spec, logits, keys, steps, temperature, top_p)


def _finish_codes(spec, tok, ntok, sstate, stop_table):
    """Finish code of rows that just produced ``tok`` as their ``ntok``-th token, and the new stop state."""
    eos = jnp.asarray(spec.eos_ids or (-1,), jnp.int32)
    reason = jnp.where(ntok >= spec.max_new, LENGTH, RUNNING)
    if spec.has_stop:
        sstate = stop_table[sstate, tok]
        reason = jnp.where(sstate == stop_table.shape[0] - 1, STOP, reason)
    reason = jnp.where(jnp.any(tok[:, None] == eos[None, :], axis=-1), EOS, reason)
    return reason, sstate


def _over_layers(spec, fn, x, layers, lora_layers, *per_layer):
    """``x, outs = fn(x, p, lp, *xs)`` over the layers: a Python loop over per-layer lists (unrolled)
    or a ``lax.scan`` over stacked trees; ``outs`` is a list of per-layer tuples or a tuple of stacks."""
    if spec.scan_layers:
        def body(x, xs):
            p, lp, *rest = xs
            return fn(x, p, lp, *rest)

        return jax.lax.scan(body, x, (layers, lora_layers, *per_layer))
    outs = []
    for i in range(spec.cfg.n_layers):
        lp = None if lora_layers is None else lora_layers[i]
        x, o = fn(x, layers[i], lp, *(a[i] for a in per_layer))
        outs.append(o)
    return x, outs


def _layer_list(spec, caches):
    """Per-layer (k, v) pairs as two sequences indexable by layer (stacked arrays or lists)."""
    if spec.scan_layers:
        return caches
    return [c[0] for c in caches], [c[1] for c in caches]


# ----------------------------------------------------------------------------- prefill


def prefill(spec: _ESpec, mesh, rules, weights, lora, lora_scale, prefix, prefix_len, tokens, lengths):
    """Prefill right-padded suffixes ``tokens [R, P]`` (real lengths ``lengths``) on top of the shared
    ``prefix`` (per-layer ``[K, Sp, Dh]`` keys/values, ``prefix_len`` real slots; None without one).
    Returns the suffixes' keys/values (per layer ``[R, K, P, Dh]``, in the cache layout) and the float32
    logits after each row's last real token ``[R, V]``."""
    cfg = spec.cfg
    dtype = jnp.dtype(cfg.dtype)
    R, P = tokens.shape
    window = cfg.sliding_window
    qpos = prefix_len + jnp.arange(P, dtype=jnp.int32)  # absolute positions of the suffix tokens
    positions = jnp.broadcast_to(qpos[None], (R, P))
    own = qpos[:, None] >= qpos[None, :]
    if window is not None:
        own &= (qpos[:, None] - qpos[None, :]) < window
    mask = jnp.broadcast_to(own[None], (R, P, P))
    Sp = spec.prefix_len
    if Sp:
        kp = jnp.arange(Sp, dtype=jnp.int32)
        pm = kp[None, :] < prefix_len
        if window is not None:
            pm &= (qpos[:, None] - kp[None, :]) < window
        mask = jnp.concatenate([jnp.broadcast_to(pm[None], (R, P, Sp)), mask], axis=-1)
    x = _embed(spec, mesh, rules, weights, tokens)
    rope = D.rotary(cfg, positions, dtype)
    proj = layer_proj(spec, lora_scale)  # prefill rows are many tokens: XLA's dot

    def layer(x, p, lp, *pre):
        attend = D.prefill_attention(cfg, mask, pre if Sp else None)
        x, (k, v) = D.layer(cfg, p, lp, x, rope, attend, proj, mesh, rules)
        to_cache = lambda a: constrain(jnp.swapaxes(a, 1, 2).astype(dtype), CACHE_NAMES, mesh, rules)  # noqa: E731
        return x, (to_cache(k), to_cache(v))

    layers = weights["layers"]
    lora_layers = None if lora is None else lora["layers"]
    per_layer = _layer_list(spec, prefix) if Sp else ()
    x, kv = _over_layers(spec, layer, x, layers, lora_layers, *per_layer)
    last = x[jnp.arange(R), lengths - 1]
    return kv, _head(spec, weights, last)


def prefix_from_kv(spec: _ESpec, mesh, rules, kv):
    """A prefilled single row as the shared prefix: per layer ``[K, Sp, Dh]``."""
    take = lambda a: constrain(a[0] if not spec.scan_layers else a[:, 0], (  # noqa: E731
        *(("layers",) if spec.scan_layers else ()), *PREFIX_NAMES), mesh, rules)
    if spec.scan_layers:
        return take(kv[0]), take(kv[1])
    return [(take(k), take(v)) for k, v in kv]


# ----------------------------------------------------------------------------- decode state


def init_state(spec: _ESpec, mesh, rules):
    cfg = spec.cfg
    B, Ss, K, Dh, L = spec.slots, spec.cache_len, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    dtype = jnp.dtype(cfg.dtype)

    def cache():
        if spec.scan_layers:
            z = jnp.zeros((L, B, K, Ss, Dh), dtype)
            return (z, z)
        z = constrain(jnp.zeros((B, K, Ss, Dh), dtype), CACHE_NAMES, mesh, rules)
        return [(z, z) for _ in range(L)]

    zi = jnp.zeros((B,), jnp.int32)
    extra = {"logits": jnp.zeros((B, spec.max_new, cfg.vocab_size), jnp.float32)} if spec.return_logits else {}
    return {
        **extra, "caches": cache(), "tok": zi, "cur": zi, "ntok": zi, "out": jnp.zeros((B, spec.max_new), jnp.int32),
        "done": jnp.ones((B,), bool), "finish": zi, "sstate": zi, "seeds": jnp.zeros((B,), jnp.uint32),
        "hashes": jnp.zeros((B,), jnp.uint32), "live_steps": jnp.int32(0), "steps": jnp.int32(0),
    }


def state_shardings(spec: _ESpec, mesh, rules, state):
    """NamedShardings for the decode state (slots over the data axes, kv heads over ``tensor``)."""
    if mesh is None:
        return None

    def names(path, a):
        key = str(path[0].key) if path else ""
        if key == "caches":
            return (("layers",) if spec.scan_layers else ()) + CACHE_NAMES
        if a.ndim == 0:
            return ()
        return ("batch",) + (None,) * (a.ndim - 1)

    return jax.tree_util.tree_map_with_path(
        lambda p, a: named_sharding(mesh, names(p, a), a.shape, rules), state)


def insert(spec: _ESpec, mesh, rules, state, kv, logits, lengths, src, seeds, hashes, stop_table, temperature,
           top_p):
    """Copy prefilled rows into decode slots: slot ``b`` takes row ``src[b]`` of ``kv``/``logits``
    (``-1``: the slot is left alone), with its sample's ``seeds``/``hashes``; samples each new row's
    first token from the prefill logits (token index 0)."""
    take = src >= 0
    s = jnp.maximum(src, 0)

    def put(c, new):  # c [..., B, K, Ss, Dh], new [..., R, K, P, Dh]
        lead = c.ndim - 4
        g = jnp.take(new, s, axis=lead)
        P = new.shape[-2]
        old = jax.lax.slice_in_dim(c, 0, P, axis=c.ndim - 2)
        m = take.reshape((1,) * lead + (-1, 1, 1, 1))
        return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(m, g.astype(c.dtype), old), 0, c.ndim - 2)

    if spec.scan_layers:
        caches = (put(state["caches"][0], kv[0]), put(state["caches"][1], kv[1]))
    else:
        caches = [(put(ck, k), put(cv, v)) for (ck, cv), (k, v) in zip(state["caches"], kv)]
    keys = _keys(seeds, hashes)
    tok = _sample_rows(spec, logits[s], keys, jnp.zeros_like(src), temperature, top_p)
    one = jnp.ones_like(src)
    reason, sstate = _finish_codes(spec, tok, one, jnp.zeros_like(src), stop_table)
    w = lambda new, old: jnp.where(take, new, old)  # noqa: E731
    out = jnp.where(take[:, None], jnp.zeros_like(state["out"]).at[:, 0].set(tok), state["out"])
    if spec.return_logits:
        lb = jnp.zeros_like(state["logits"]).at[:, 0].set(logits[s])
        state = {**state, "logits": jnp.where(take[:, None, None], lb, state["logits"])}
    return {
        **state, "caches": caches, "tok": w(tok, state["tok"]), "cur": w(lengths[s], state["cur"]),
        "ntok": w(one, state["ntok"]), "out": out, "done": w(reason != RUNNING, state["done"]),
        "finish": w(reason, state["finish"]), "sstate": w(sstate, state["sstate"]),
        "seeds": w(seeds, state["seeds"]), "hashes": w(hashes, state["hashes"]),
    }


# ----------------------------------------------------------------------------- decode


def decode(spec: _ESpec, mesh, rules, state, weights, lora, lora_scale, prefix, prefix_len, stop_table,
           temperature, top_p, max_steps, refill):
    """Decode every live slot until ``refill`` slots have finished (``0``: no request waits; then until
    all finish), or ``max_steps`` steps. Returns the new state."""
    cfg = spec.cfg
    dtype = jnp.dtype(cfg.dtype)
    B, Sp = spec.slots, spec.prefix_len
    window = cfg.sliding_window
    layers = weights["layers"]
    lora_layers = None if lora is None else lora["layers"]
    bidx = jnp.arange(B, dtype=jnp.int32)
    done0 = state["done"]
    keys = _keys(state["seeds"], state["hashes"])
    skinny = skinny_for(spec)
    proj = layer_proj(spec, lora_scale, skinny)
    kernel = attention_kernel_for(spec)

    def cond(c):
        i, st = c
        newly = jnp.sum(st["done"] & ~done0, dtype=jnp.int32)
        return (i < max_steps) & ~jnp.all(st["done"]) & ~((refill > 0) & (newly >= refill))

    def body(c):
        i, st = c
        cur, live = st["cur"], ~st["done"]
        pos = prefix_len + cur  # absolute position of the token fed now
        # the slots read: [0, cur), within the window; none for finished rows (their output is dropped)
        lo = jnp.zeros_like(cur) if window is None else jnp.maximum(cur - window + 1, 0)
        span = (lo, jnp.where(live, cur, lo))
        pvalid = None
        if Sp:
            kp = jnp.arange(Sp, dtype=jnp.int32)
            pvalid = jnp.broadcast_to(kp[None, :] < prefix_len, (B, Sp))
            if window is not None:
                pvalid &= (pos[:, None] - kp[None, :]) < window
        x = _embed(spec, mesh, rules, weights, st["tok"][:, None])
        rope = D.rotary(cfg, pos[:, None], dtype)

        def layer(x, p, lp, ck, cv, *pre):
            attend = D.decode_attention(cfg, ck, cv, span, pre if Sp else None, pvalid, kernel)
            x, (k, v) = D.layer(cfg, p, lp, x, rope, attend, proj, mesh, rules)
            k, v = k[:, 0].astype(ck.dtype), v[:, 0].astype(cv.dtype)  # [B, K, Dh]
            if spec.scan_layers:
                return x, (k, v)
            return x, (ck.at[bidx, :, cur].set(k), cv.at[bidx, :, cur].set(v))

        ck_l, cv_l = _layer_list(spec, st["caches"])
        per_layer = (ck_l, cv_l) + (tuple(_layer_list(spec, prefix)) if Sp else ())
        x, res = _over_layers(spec, layer, x, layers, lora_layers, *per_layer)
        if spec.scan_layers:
            k_new, v_new = res  # [L, B, K, Dh]
            ck_all, cv_all = st["caches"]
            caches = (ck_all.at[:, bidx, :, cur].set(jnp.swapaxes(k_new, 0, 1)),
                      cv_all.at[:, bidx, :, cur].set(jnp.swapaxes(v_new, 0, 1)))
        else:
            caches = res
        logits = _head(spec, weights, x[:, -1], skinny)
        ntok = st["ntok"]
        tok = _sample_rows(spec, logits, keys, ntok, temperature, top_p)
        reason, sstate = _finish_codes(spec, tok, ntok + 1, st["sstate"], stop_table)
        wl = lambda new, old: jnp.where(live, new, old)  # noqa: E731
        out = st["out"].at[bidx, jnp.minimum(ntok, spec.max_new - 1)].set(wl(tok, st["out"][bidx, jnp.minimum(
            ntok, spec.max_new - 1)]))
        if spec.return_logits:
            at = (bidx, jnp.minimum(ntok, spec.max_new - 1))
            st = {**st, "logits": st["logits"].at[at].set(jnp.where(live[:, None], logits, st["logits"][at]))}
        new = {
            **st, "caches": caches, "tok": wl(tok, st["tok"]), "cur": wl(cur + 1, cur), "ntok": wl(ntok + 1, ntok),
            "out": out, "done": st["done"] | (live & (reason != RUNNING)), "finish": wl(reason, st["finish"]),
            "sstate": wl(sstate, st["sstate"]), "live_steps": st["live_steps"] + jnp.sum(live, dtype=jnp.int32),
            "steps": st["steps"] + 1,
        }
        return i + 1, new

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state


def _replace(spec: _ESpec, **kw) -> _ESpec:
    return dataclasses.replace(spec, **kw)


def jit_program(fn, spec, mesh, rules, donate: bool = False, out_shardings=None):
    """Engine program ``fn`` (prefill, insert, decode, ...) jitted for ``spec`` on ``mesh``; the decode
    state (the first argument) is donated when ``donate``."""
    return jax.jit(partial(fn, spec, mesh, rules), donate_argnums=(0,) if donate else (), out_shardings=out_shardings)


def compile_program(name, fn, spec, mesh, rules, args, compiler_options, donate=False, out_shardings=None):
    """Lower and compile one engine program ahead of time; returns (compiled, seconds, options used)."""
    t0 = time.perf_counter()
    lowered = jit_program(fn, spec, mesh, rules, donate, out_shardings).lower(*args)
    try:
        prog = lowered.compile(compiler_options=compiler_options or None)
    except Exception as e:  # an option unknown to this XLA: compile without it
        if not compiler_options:
            raise
        log.warning("compiling without compiler options %s (%s)", compiler_options, e)
        compiler_options = {}
        prog = lowered.compile()
    return prog, time.perf_counter() - t0, compiler_options
