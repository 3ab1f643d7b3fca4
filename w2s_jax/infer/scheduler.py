"""Host side of the continuous-batching engine (:mod:`w2s_jax.infer.engine` holds its programs): the
request queue, the shared prefix, prefill groups, and the loop that refills decode slots as rows finish."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from w2s_jax.core.lengths import doubling_buckets, pick_bucket
from w2s_jax.infer import engine as E
from w2s_jax.infer.requests import prompt_hash
from w2s_jax.parallel.distributed import to_host

__all__ = ["Engine", "common_prefix", "MIN_PREFIX", "PREFIX_CACHE_MAX", "REFILL_FRACTION"]

MIN_PREFIX = 16  # shortest common prefix (tokens) that is prefilled once and shared
PREFIX_CACHE_MAX = 4  # shared prefixes kept per Sampler
# while requests wait, the decode loop returns to the host once slots // REFILL_FRACTION slots (at
# least one) have finished, and they are refilled together (one prefill for several prompts)
REFILL_FRACTION = 8


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


def pow2_at_least(n: int, cap: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


@dataclass
class Group:
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
        self.prefix_bucket = pick_bucket(Sp, doubling_buckets(sampler.cfg.max_seq_len)) if Sp else 0
        self.hashes = {i: prompt_hash(ids[i]) for i in order}
        self.suffix_buckets = tuple(sorted(prompt_buckets))
        max_suffix = max((len(ids[i]) - Sp for i in order), default=1)
        self.P = pick_bucket(max_suffix, self.suffix_buckets)
        dp = sampler.data_parallel
        self.B = pick_bucket(min(len(rows), bs), batch_buckets) if rows else dp
        self.max_group = self.B
        cfg = sampler.cfg
        self.spec = E._ESpec(
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
        spec = E._replace(spec, slots=0, cache_len=0, max_new=0, greedy=True, top_k=0, use_top_p=False,
                        has_stop=False, eos_ids=(), cpu_kernels=False, return_logits=False)
        args = (s.weights, s.lora, jnp.float32(s.lora_scale), prefix, jnp.int32(prefix_len),
                s._place(tokens, ("batch", "length")), s._place(lengths, ("batch",)))
        prog = s._engine_program("prefill", E.prefill, spec, args,
                                 detail=f"prefill {tokens.shape[0]}x{tokens.shape[1]}")
        return prog(*args)

    def _prefix_cache(self):
        s, Sp = self.s, len(self.prefix)
        if not Sp:
            return None
        key = (self.prefix, self.spec.scan_layers)
        if key in s._prefixes:
            return s._prefixes[key]
        spec0 = E._replace(self.spec, prefix_len=0, slots=1)
        tokens = np.full((1, self.prefix_bucket), self.pad, np.int32)
        tokens[0, :Sp] = self.prefix
        kv, _ = self._prefill(spec0, tokens, np.asarray([Sp], np.int32), None, 0)
        s.stats["prefill_tokens"] += Sp
        pre = s._engine_program("prefix", E.prefix_from_kv, spec0, (kv,), detail="shared prefix")(kv)
        if len(s._prefixes) >= PREFIX_CACHE_MAX:
            s._prefixes.pop(next(iter(s._prefixes)))
        s._prefixes[key] = pre
        return pre

    # -- the loop

    def run(self) -> Iterator[tuple[int, int, list[int], int]]:
        """Yield ``(prompt, sample, generated ids, finish code)`` as rows finish (with ``return_logits``,
        each row's float32 logits ``[num_tokens, V]`` go to ``self.logits[(prompt, sample)]``)."""
        s, sc, spec, B = self.s, self.sc, self.spec, self.B
        if not self.queue:
            return
        prefix = self._prefix_cache()
        Sp = len(self.prefix)
        state = s._engine_init(spec)
        stop_table = s._stop_table(sc.stop) if spec.has_stop else None
        temperature, top_p = self._scalars()
        slot: list[tuple[int, int] | None] = [None] * B
        group: Group | None = None
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
                prog = s._engine_program("insert", E.insert, spec, args, donate=True, detail="insert")
                state = prog(*args)
            if all(x is None for x in slot):
                break
            waiting = sum(len(js) for _, js in self.queue) + (len(group.rows) if group is not None else 0)
            refill = min(waiting, max(1, B // REFILL_FRACTION))
            args = (state, s.weights, s.lora, jnp.float32(s.lora_scale), prefix, jnp.int32(Sp), stop_table,
                    temperature, top_p, jnp.int32(sc.max_new_tokens), jnp.int32(refill))
            prog = s._engine_program("decode", E.decode, spec, args, donate=True,
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

    def _next_group(self, want: int, prefix, Sp: int) -> Group:
        """Prefill the next prompts of the queue: enough for ``want`` rows, at most ``max_group`` prompts
        (one prefill program per (prompts bucket, suffix bucket))."""
        picked, rows = [], 0
        while self.queue and rows < want and len(picked) < self.max_group:
            i, js = self.queue.popleft()
            picked.append((i, js))
            rows += len(js)
        R = pow2_at_least(len(picked), self.max_group)
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
        spec = E._replace(self.spec, slots=R)
        kv, logits = self._prefill(spec, tokens, lengths, prefix, Sp)
        return Group(kv, logits, self.s._place(lengths, ("batch",)), out)
