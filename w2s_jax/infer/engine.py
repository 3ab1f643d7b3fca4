"""Continuous-batching generation with shared-prefix prefill: the engine behind :class:`Sampler`.

See ``docs/generation.md`` for the design and the measured speed-ups. In short:

- **Shared prefix.** The longest token prefix common to every prompt of a ``stream`` call (the
  few-shot demonstrations in front of each question), when it is at least :data:`MIN_PREFIX` tokens,
  is prefilled once (cached on the Sampler by its token ids) into a ``[K, Sp, Dh]`` per-layer cache
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

import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.infer.sampler import _prompt_hash, default_prompt_buckets, pick_bucket
from w2s_jax.infer.sampling import EOS, LENGTH, RUNNING, STOP, head_logits, layer_proj, sample_rows, skinny_for
from w2s_jax.models import decoder as D
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.decoder import rms_norm
from w2s_jax.parallel.sharding import constrain, named_sharding

log = logging.getLogger("w2s_jax.infer.sampler")

MIN_PREFIX = 16  # shortest common prefix (tokens) that is prefilled once and shared
PREFIX_CACHE_MAX = 4  # shared prefixes kept per Sampler
# while requests wait, the decode loop returns to the host once slots // REFILL_FRACTION slots (at
# least one) have finished, and they are refilled together (one prefill for several prompts)
REFILL_FRACTION = 8
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
    cfg = spec.cfg
    x = weights["embed"].astype(jnp.dtype(cfg.dtype))[tok]
    if cfg.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
    return constrain(x, ("batch", "length", "embed"), mesh, rules)


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
    B, Ss, Sp = spec.slots, spec.cache_len, spec.prefix_len
    window = cfg.sliding_window
    layers = weights["layers"]
    lora_layers = None if lora is None else lora["layers"]
    bidx = jnp.arange(B, dtype=jnp.int32)
    kslots = jnp.arange(Ss, dtype=jnp.int32)
    done0 = state["done"]
    keys = _keys(state["seeds"], state["hashes"])
    skinny = skinny_for(spec)
    proj = layer_proj(spec, lora_scale, skinny)

    def cond(c):
        i, st = c
        newly = jnp.sum(st["done"] & ~done0, dtype=jnp.int32)
        return (i < max_steps) & ~jnp.all(st["done"]) & ~((refill > 0) & (newly >= refill))

    def body(c):
        i, st = c
        cur, live = st["cur"], ~st["done"]
        pos = prefix_len + cur  # absolute position of the token fed now
        valid = kslots[None, :] < cur[:, None]
        if window is not None:
            valid &= (pos[:, None] - (prefix_len + kslots[None, :])) < window
        pvalid = None
        if Sp:
            kp = jnp.arange(Sp, dtype=jnp.int32)
            pvalid = jnp.broadcast_to(kp[None, :] < prefix_len, (B, Sp))
            if window is not None:
                pvalid &= (pos[:, None] - kp[None, :]) < window
        x = _embed(spec, mesh, rules, weights, st["tok"][:, None])
        rope = D.rotary(cfg, pos[:, None], dtype)

        def layer(x, p, lp, ck, cv, *pre):
            attend = D.decode_attention(cfg, ck, cv, valid, pre if Sp else None, pvalid)
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


# ----------------------------------------------------------------------------- host driver


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``seqs``."""
    if not seqs:
        return 0
    first = np.asarray(seqs[0])
    n = len(first)
    for s in seqs[1:]:
        m = min(n, len(s))
        if m == 0:
            return 0
        diff = np.nonzero(first[:m] != np.asarray(s[:m]))[0]
        n = int(diff[0]) if len(diff) else m
        if n == 0:
            return 0
    return n


def _pow2_at_least(n: int, cap: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


@dataclass
class _Group:
    """Prefilled prompts waiting for decode slots."""

    kv: Any
    logits: Any
    lengths: Any
    rows: deque  # (row in group, prompt index, sample index)


class Engine:
    """Host-side driver of one ``Sampler.stream`` call (see the module docstring)."""

    def __init__(self, sampler, sc, ids: list[list[int]], rows: list[tuple[int, int]], batch_buckets,
                 prompt_buckets, bs: int, return_logits: bool = False):
        self.s, self.sc, self.ids = sampler, sc, ids
        by_prompt: dict[int, list[int]] = {}
        for i, j in rows:
            by_prompt.setdefault(i, []).append(j)
        order = sorted(by_prompt, key=lambda i: (-len(ids[i]), i))
        self.queue = deque((i, by_prompt[i]) for i in order)
        used = [ids[i] for i in order]
        lcp = min(common_prefix(used), min((len(t) for t in used), default=1) - 1) if len(used) > 1 else 0
        self.prefix = tuple(used[0][:lcp]) if lcp >= MIN_PREFIX else ()
        Sp = len(self.prefix)
        self.prefix_bucket = pick_bucket(Sp, _prefix_buckets(sampler.cfg.max_seq_len)) if Sp else 0
        self.hashes = {i: _prompt_hash(ids[i]) for i in order}
        self.suffix_buckets = tuple(sorted(prompt_buckets))
        max_suffix = max((len(ids[i]) - Sp for i in order), default=1)
        self.P = pick_bucket(max_suffix, self.suffix_buckets)
        dp = sampler.data_parallel
        self.B = pick_bucket(min(len(rows), bs), batch_buckets) if rows else dp
        self.max_group = self.B
        cfg = sampler.cfg
        self.spec = _ESpec(
            cfg=cfg, slots=self.B, cache_len=self.P + sc.max_new_tokens, max_new=sc.max_new_tokens,
            prefix_len=self.prefix_bucket, greedy=sc.greedy, top_k=0 if sc.greedy else min(sc.top_k, cfg.vocab_size),
            use_top_p=(not sc.greedy) and sc.top_p < 1.0,
            has_stop=bool(sc.stop) and sampler.tokenizer is not None, eos_ids=sampler.eos_ids,
            scan_layers=sampler.layer_loop == "scan", has_lora=sampler.lora is not None,
            cpu_kernels=sampler.cpu_kernels, platform=sampler.platform, return_logits=return_logits,
        )
        self.logits: dict[tuple[int, int], np.ndarray] = {}
        self.pad = sampler.tokenizer.pad_id if sampler.tokenizer is not None else (cfg.pad_token_id or 0)

    # -- programs

    def _scalars(self):
        sc = self.sc
        return jnp.float32(max(sc.temperature, 1e-6)), jnp.float32(sc.top_p)

    def _prefill(self, spec, tokens, lengths, prefix, prefix_len):
        s = self.s
        # (only the model, the layer loop and the prefix bucket matter: one program for every sampling mode)
        spec = _replace(spec, slots=0, cache_len=0, max_new=0, greedy=True, top_k=0, use_top_p=False,
                        has_stop=False, eos_ids=(), cpu_kernels=False, return_logits=False)
        args = (s.weights, s.lora, jnp.float32(s.lora_scale), prefix, jnp.int32(prefix_len),
                s._place(tokens, ("batch", "length")), s._place(lengths, ("batch",)))
        prog = s._engine_program("prefill", prefill, spec, args, detail=f"prefill {tokens.shape[0]}x{tokens.shape[1]}")
        return prog(*args)

    def _prefix_cache(self):
        s, Sp = self.s, len(self.prefix)
        if not Sp:
            return None
        key = (self.prefix, self.spec.scan_layers)
        if key in s._prefixes:
            return s._prefixes[key]
        spec0 = _replace(self.spec, prefix_len=0, slots=1)
        tokens = np.full((1, self.prefix_bucket), self.pad, np.int32)
        tokens[0, :Sp] = self.prefix
        kv, _ = self._prefill(spec0, tokens, np.asarray([Sp], np.int32), None, 0)
        s.stats["prefill_tokens"] += Sp
        pre = s._engine_program("prefix", prefix_from_kv, spec0, (kv,), detail="shared prefix")(kv)
        if len(s._prefixes) >= PREFIX_CACHE_MAX:
            s._prefixes.pop(next(iter(s._prefixes)))
        s._prefixes[key] = pre
        return pre

    # -- the loop

    def run(self) -> Iterator[tuple[int, int, list[int], int]]:
        """Yield ``(prompt, sample, generated ids, finish code)`` as rows finish (with ``return_logits``,
        each row's float32 logits ``[num_tokens, V]`` go to ``self.logits[(prompt, sample)]``)."""
        from w2s_jax.parallel.distributed import to_host

        s, sc, spec, B = self.s, self.sc, self.spec, self.B
        if not self.queue:
            return
        prefix = self._prefix_cache()
        Sp = len(self.prefix)
        state = s._engine_init(spec)
        stop_table = s._stop_table(sc.stop) if spec.has_stop else None
        temperature, top_p = self._scalars()
        slot: list[tuple[int, int] | None] = [None] * B
        group: _Group | None = None
        steps0 = live0 = 0
        while True:
            free = [b for b in range(B) if slot[b] is None]
            while free and (self.queue or (group is not None and group.rows)):
                if group is None or not group.rows:
                    group = self._next_group(len(free), prefix, Sp)
                src = np.full((B,), -1, np.int32)
                seeds = np.zeros((B,), np.uint32)
                hashes = np.zeros((B,), np.uint32)
                while free and group.rows:
                    r, i, j = group.rows.popleft()
                    b = free.pop(0)
                    src[b], seeds[b], hashes[b] = r, sc.seed + j, self.hashes[i]
                    slot[b] = (i, j)
                args = (state, group.kv, group.logits, group.lengths, s._place(src, ("batch",)),
                        s._place(seeds, ("batch",)), s._place(hashes, ("batch",)), stop_table, temperature, top_p)
                prog = s._engine_program("insert", insert, spec, args, donate=True, detail="insert")
                state = prog(*args)
            if all(x is None for x in slot):
                break
            waiting = sum(len(js) for _, js in self.queue) + (len(group.rows) if group is not None else 0)
            refill = min(waiting, max(1, B // REFILL_FRACTION))
            args = (state, s.weights, s.lora, jnp.float32(s.lora_scale), prefix, jnp.int32(Sp), stop_table,
                    temperature, top_p, jnp.int32(sc.max_new_tokens), jnp.int32(refill))
            prog = s._engine_program("decode", decode, spec, args, donate=True,
                                     detail=f"decode {B} slots x {spec.cache_len}")
            state = prog(*args)
            done, ntok, finish, out, steps, live = to_host(
                (state["done"], state["ntok"], state["finish"], state["out"], state["steps"], state["live_steps"]))
            s.stats["slot_steps"] += (int(steps) - steps0) * B
            s.stats["live_slot_steps"] += int(live) - live0
            steps0, live0 = int(steps), int(live)
            logits = to_host(state["logits"]) if spec.return_logits else None
            for b in range(B):
                if slot[b] is not None and done[b]:
                    i, j = slot[b]
                    slot[b] = None
                    k = int(ntok[b])
                    if logits is not None:
                        self.logits[(i, j)] = logits[b, :k]
                    yield i, j, [int(t) for t in out[b, :k]], int(finish[b])

    def _next_group(self, want: int, prefix, Sp: int) -> _Group:
        """Prefill the next prompts of the queue: enough for ``want`` rows, at most ``max_group`` prompts
        (one prefill program per (prompts bucket, suffix bucket))."""
        picked, rows = [], 0
        while self.queue and rows < want and len(picked) < self.max_group:
            i, js = self.queue.popleft()
            picked.append((i, js))
            rows += len(js)
        R = _pow2_at_least(len(picked), self.max_group)
        P = pick_bucket(max(len(self.ids[i]) - Sp for i, _ in picked), self.suffix_buckets)
        tokens = np.full((R, P), self.pad, np.int32)
        lengths = np.ones((R,), np.int32)
        out = deque()
        for r, (i, js) in enumerate(picked):
            t = self.ids[i][Sp:]
            tokens[r, : len(t)] = t
            lengths[r] = len(t)
            out.extend((r, i, j) for j in js)
        self.s.stats["prefill_tokens"] += int(lengths[: len(picked)].sum())
        spec = _replace(self.spec, slots=R)
        kv, logits = self._prefill(spec, tokens, lengths, prefix, Sp)
        return _Group(kv, logits, self.s._place(lengths, ("batch",)), out)


def _prefix_buckets(max_len: int) -> tuple[int, ...]:
    return default_prompt_buckets(max_len)


def _replace(spec: _ESpec, **kw) -> _ESpec:
    import dataclasses

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
