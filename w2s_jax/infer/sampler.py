"""Fast batched generation: continuous batching with shared-prefix prefill, or static batches.

Usage::

    sampler = Sampler(params, cfg, tokenizer, mesh=None, lora=None)
    outs = sampler.generate(["Question: 1+1?\\nAnswer:"], SampleConfig(max_new_tokens=256, n=10,
                            temperature=1.0, seed=0, stop=("Question", "Answer")))
    outs[0][3].text, outs[0][3].finish_reason        # prompt 0, sample 3 (seed 0 + 3)

Engines
-------
``Sampler(engine="continuous")`` (the default, used by ``w2s generate`` and every pipeline stage) runs
:mod:`w2s_jax.infer.engine`: a prefix common to all prompts of a call (the few-shot demonstrations) is
prefilled once and shared by every row, the ``n`` samples of a prompt share one prefill, and a fixed
set of decode slots is refilled as rows finish (continuous batching); see ``docs/generation.md``.
``engine="static"`` keeps the static batches (one prefill + decode program per batch). Both use the
same weights layout, layer function, sampling, stop-string automaton and PRNG keys, so greedy
outputs are the same token for token (up to float rounding of near-ties) and a sample's key depends
only on (seed, prompt, sample).

Design
------
The static engine's program (one prefill + ``while_loop`` per batch, its KV cache, the one layer
function and the layer loop both engines use) is described in :mod:`w2s_jax.infer.static`; the
continuous engine in :mod:`w2s_jax.infer.engine`.

- **Native matrix-vector kernel on CPU**: decoding at batch 1 streams every weight once per token, so
  its speed is memory bandwidth. With float32 weights on an unsharded CPU Sampler, products with at
  most ``cpu_kernels.SKINNY_MAX_ROWS`` rows (the decode steps of batches up to 16) go to an XLA FFI
  kernel (``csrc/skinny_matmul.cc``, compiled for the host on first use) that reads eight adjacent
  weight rows per pass on all intra-op threads: 1.04x to 1.20x XLA's dot on the SmolLM2 shape at batch
  1, depending on how much memory bandwidth the VM had free (see README).
  ``Sampler(cpu_kernels=False)`` or ``W2S_CPU_KERNELS=0`` keeps XLA's dot; without a C++ compiler the
  Sampler falls back to it with a warning.
- **Sampling** is fused into the loop: greedy (``temperature == 0``) is ``argmax``; otherwise
  ``logits / temperature``, optionally restricted to the ``top_k`` largest (ties at the k-th value
  kept) and to the nucleus ``top_p`` (the smallest set of most probable tokens whose mass reaches
  ``top_p``, found by an exact bisection on the probability threshold rather than a full sort; ties
  at the threshold kept), then Gumbel-max with the row's key.
- **Stop strings** are detected inside the loop in token space: an Aho-Corasick automaton over the
  characters of the stop strings is lifted to whole tokens on the host once (a table
  ``[automaton states, vocab]`` built from each token's text piece), and each step does one gather
  per row. The pieces come from ``decode([ref, id])`` minus ``decode([ref])`` (which keeps
  sentencepiece's leading spaces). The host then decodes the generated ids and cuts the text at the
  first stop string, which is what the saved text is based on: a stop string the token automaton
  missed (e.g. split inside a multi-byte character) is still cut on the host (finish_reason
  ``stop``); it only cost extra decode steps.

Outputs (:class:`Completion`)
-----------------------------
``token_ids``: every generated id up to and including the one that finished the row (the EOS, or
the token that completed a stop string); ``num_tokens == len(token_ids)``; ``finish_reason``:
``eos`` | ``stop`` | ``length`` (``max_new_tokens`` reached); ``text``: the generated ids without
the EOS, decoded (special tokens skipped), cut before the first occurrence of any stop string and
stripped of surrounding whitespace -- what the grader's step 1 does. (``prompts.clean_response``
additionally drops trailing periods, as the paper's saved responses do; the CLI applies it.)

Seeds and reproducibility
-------------------------
Sample ``j`` of a prompt uses seed ``seed + j`` (the paper's seeds 0..9 are ``seed=0, n=10``). Its
PRNG key is ``fold_in(key(seed + j), crc32(prompt token ids))`` and step ``t`` uses
``fold_in(that, t)``: the key depends only on (seed, prompt content, sample index, step), never on
the batch it lands in or its position there. Guaranteed: the same (prompt, seed) gives the same
tokens in any batch composition and position *with the same batch and prompt-length buckets* (rows
of a program are computed independently; tested). Across different bucket shapes the float
reductions may be ordered differently, so logits can differ in the last bits: greedy text is then
identical unless two top logits are within rounding of each other, and a sampled text can differ.
The CLI keeps shapes stable by sorting rows by length and using fixed buckets. The continuous engine
uses the same keys; a row never mixes with the other rows of its slots, so the same (prompt, seed)
gives the same tokens whichever requests share the run, in any order, with samples skipped
(resuming) and against the static engine (all tested); the same float caveat applies across shapes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.core.lengths import doubling_buckets, pick_bucket, round_up
from w2s_jax.core.programs import ProgramCache
from w2s_jax.infer import engine as E
from w2s_jax.infer import kernels as native
from w2s_jax.infer.layer_loop import auto_layer_loop, default_layer_loop, unstack
from w2s_jax.infer.requests import (
    Completion,
    SampleConfig,
    completion,
    default_batch_buckets,
    default_prompt_buckets,
    encode_prompts,
    fit_prompts,
    prompt_hash,
    prompt_limit,
)
from w2s_jax.infer.scheduler import Engine
from w2s_jax.infer.static import Spec, program
from w2s_jax.infer.stops import StopMatcher, cut_at_stop, token_pieces
from w2s_jax.models import prepare
from w2s_jax.models.config import ModelConfig
from w2s_jax.parallel.distributed import to_host
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, named_sharding

__all__ = [
    "SampleConfig",
    "Completion",
    "Sampler",
    "StopMatcher",
    "token_pieces",
    "cut_at_stop",
    "default_prompt_buckets",
    "default_batch_buckets",
    "ProgramCache",
    "SHARED_PROGRAMS",
    "CPU_COMPILER_OPTIONS",
    "default_layer_loop",
]

log = logging.getLogger(__name__)

CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
# compiled generation programs keyed by everything that goes into compilation (the static spec, mesh, rules,
# compiler options, argument shapes, dtypes and shardings; weights are arguments, so a program serves any
# weights of that shape); Samplers share this cache unless given their own
SHARED_PROGRAMS = ProgramCache(max_entries=128)


# ----------------------------------------------------------------------------- the sampler


class Sampler:
    """Batched generation for one model (see the module docstring).

    ``params``/``lora`` are the stacked trees of ``models/params.py``/``lora.py`` (LoRA applied unmerged with
    ``lora_scale``; merged weights are just other params). ``tokenizer`` is needed for text prompts,
    text outputs and stop strings (``None``: token-id prompts only; no text, stop strings ignored).
    ``layer_loop``: ``"unroll"`` (per-layer weights, the CPU and GPU default), ``"scan"`` (stacked
    weights, the TPU default) or ``"auto"`` (:func:`default_layer_loop`). ``eos_ids`` default: the
    tokenizer's and the config's EOS. ``programs``: where compiled programs are kept and looked up
    (default :data:`SHARED_PROGRAMS`, shared by every Sampler of the process).
    """

    def __init__(
        self,
        params: dict,
        cfg: ModelConfig,
        tokenizer=None,
        mesh=None,
        rules: Rules = DEFAULT_RULES,
        lora: dict | None = None,
        lora_scale: float = 1.0,
        layer_loop: str = "auto",
        eos_ids: Sequence[int] | None = None,
        compiler_options: dict[str, Any] | None = None,
        fuse_projections: bool | None = None,
        matmul_split: int = 1,
        head_chunks: int = 1,
        cpu_kernels: bool | None = None,
        engine: str = "continuous",
        programs: ProgramCache | None = None,
    ):
        if layer_loop not in ("auto", "unroll", "scan"):
            raise UserError(f"layer_loop must be auto, unroll or scan, got {layer_loop!r}")
        if engine not in ("continuous", "static"):
            raise UserError(f"engine must be continuous or static, got {engine!r}")
        self.engine = engine
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = rules
        self.lora_scale = float(lora_scale)
        device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
        self.platform = platform = device.platform
        if layer_loop == "auto":
            layer_loop = auto_layer_loop(platform, params["layers"], device)
        self.layer_loop = layer_loop
        if compiler_options is None:
            compiler_options = dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else {}
        self.compiler_options = compiler_options
        if eos_ids is None:
            eos_ids = [i for i in (getattr(tokenizer, "eos_id", None), cfg.eos_token_id) if i is not None]
        self.eos_ids = tuple(sorted({int(i) for i in eos_ids}))
        if fuse_projections is None:  # only where no mesh axis splits heads or mlp (the concat would mix them)
            fuse_projections = mesh is None or all(
                named_sharding(mesh, (n,), None, rules).spec[0] is None for n in ("heads", "kv_heads", "mlp")
            )
        self.fuse_projections = bool(fuse_projections) and layer_loop == "unroll"
        self.matmul_split = max(1, int(matmul_split)) if mesh is None else 1
        native_ok = platform == "cpu" and layer_loop == "unroll"
        if cpu_kernels is None:  # unsharded CPU decoding: the native matrix-vector kernel when it builds
            cpu_kernels = native_ok and (mesh is None or mesh.size == 1) and native.available()
        elif cpu_kernels and not (native_ok and native.available()):
            raise UserError("cpu_kernels=True needs the CPU backend, layer_loop='unroll' and a C++ compiler "
                            "(see w2s_jax/infer/kernels.py; the log says why the build failed)")
        self.cpu_kernels = bool(cpu_kernels)
        if layer_loop == "unroll":
            self.weights = prepare.prepare_weights(params, cfg, self.fuse_projections, self.matmul_split,
                                                   head_chunks)
            self.lora = None if lora is None else {"layers": unstack(lora["layers"], cfg.n_layers)}
        else:
            self.weights = dict(params)
            self.lora = lora
        self.programs = SHARED_PROGRAMS if programs is None else programs  # compiled programs, maybe shared
        self._programs: dict[tuple, Any] = {}  # the programs this Sampler used (num_compiled)
        self._stop_matchers: dict[tuple[str, ...], StopMatcher] = {}
        self._stop_tables: dict[tuple[str, ...], jax.Array] = {}
        self._pieces: list[str] | None = None
        self._prefixes: dict[tuple, Any] = {}  # shared prefix token ids -> its prefilled keys/values
        self.compile_seconds = 0.0
        self.stats = {"rows": 0, "tokens": 0, "seconds": 0.0, "truncated": 0, "slot_steps": 0,
                      "live_slot_steps": 0, "prefill_tokens": 0}

    @property
    def occupancy(self) -> float:
        """Share of decode slot-steps spent on live rows so far (1.0 before any decoding)."""
        return self.stats["live_slot_steps"] / self.stats["slot_steps"] if self.stats["slot_steps"] else 1.0

    # -- bookkeeping

    @property
    def num_compiled(self) -> int:
        """Programs compiled so far (one per distinct bucket / sampling mode)."""
        return len(self._programs)

    @property
    def data_parallel(self) -> int:
        if self.mesh is None:
            return 1
        spec = named_sharding(self.mesh, ("batch",), None, self.rules).spec[0]
        axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
        return math.prod(self.mesh.shape[a] for a in axes)

    def stop_matcher(self, stop: tuple[str, ...]) -> StopMatcher:
        if stop not in self._stop_matchers:
            if self.tokenizer is None:
                raise UserError("stop strings need a tokenizer")
            if self._pieces is None:
                self._pieces = token_pieces(self.tokenizer, self.cfg.vocab_size)
            self._stop_matchers[stop] = StopMatcher(stop, self._pieces)
        return self._stop_matchers[stop]

    def _stop_table(self, stop: tuple[str, ...]):
        if stop not in self._stop_tables:
            table = self.stop_matcher(stop).table
            if self.mesh is not None:
                self._stop_tables[stop] = jax.device_put(table, named_sharding(self.mesh, (None, None)))
            else:
                self._stop_tables[stop] = jax.device_put(table)
        return self._stop_tables[stop]

    # -- prompts

    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts)

    def max_prompt_len(self, sc: SampleConfig) -> int:
        return prompt_limit(self.cfg.max_seq_len, sc)

    def _fit(self, ids: list[list[int]], sc: SampleConfig) -> list[list[int]]:
        out, truncated = fit_prompts(ids, sc, self.cfg.max_seq_len, getattr(self.tokenizer, "bos_id", None))
        self.stats["truncated"] += truncated
        return out

    # -- compilation

    def _program_for(self, spec: Spec, args: tuple):
        leaves, treedef = jax.tree.flatten(args)
        key = (spec, self.mesh, self.rules, tuple(sorted(self.compiler_options.items())), treedef,
               tuple((a.shape, str(a.dtype), a.sharding) for a in leaves))
        prog = self._programs.get(key)
        if prog is None and self.programs.get(key) is not None:
            prog = self._programs[key] = self.programs.get(key)
        if prog is None:
            t0 = time.perf_counter()
            fn = jax.jit(partial(program, spec, self.mesh, self.rules))
            lowered = fn.lower(*args)
            try:
                prog = lowered.compile(compiler_options=self.compiler_options or None)
            except Exception as e:  # an option unknown to this XLA: compile without it
                if not self.compiler_options:
                    raise
                log.warning("compiling without compiler options %s (%s)", self.compiler_options, e)
                self.compiler_options = {}
                prog = lowered.compile()
            dt = time.perf_counter() - t0
            self.compile_seconds += dt
            self._programs[key] = prog
            self.programs.put(key, prog)
            log.info(
                "compiled generation program #%d (batch %d, prompt %d, new %d, %s) in %.1fs",
                len(self._programs), spec.batch, spec.prompt_len, spec.max_new,
                "greedy" if spec.greedy else "sampling", dt,
            )
        return prog

    def _engine_program(self, kind: str, fn, spec, args: tuple, donate: bool = False, detail: str = ""):
        """The compiled continuous-batching program ``kind`` for these argument shapes (see engine.py)."""
        leaves, treedef = jax.tree.flatten(args)
        key = (kind, spec, self.mesh, self.rules, tuple(sorted(self.compiler_options.items())), treedef,
               tuple((a.shape, str(a.dtype)) for a in leaves))
        prog = self._programs.get(key)
        if prog is None and self.programs.get(key) is not None:
            prog = self._programs[key] = self.programs.get(key)
        if prog is None:
            out_sh = None
            if (donate or kind == "init") and self.mesh is not None:  # the state keeps its layout
                shapes = args[0] if donate else jax.eval_shape(partial(fn, spec, self.mesh, self.rules))
                out_sh = E.state_shardings(spec, self.mesh, self.rules, shapes)
            prog, dt, self.compiler_options = E.compile_program(
                kind, fn, spec, self.mesh, self.rules, args, self.compiler_options, donate=donate,
                out_shardings=out_sh)
            self.compile_seconds += dt
            self._programs[key] = prog
            self.programs.put(key, prog)
            log.info("compiled generation program #%d (%s, %s) in %.1fs", len(self._programs), detail,
                     "greedy" if spec.greedy else "sampling", dt)
        return prog

    def _engine_init(self, spec):
        """A fresh decode state for ``spec`` (every slot empty), laid out on the mesh."""
        return self._engine_program("init", lambda spec, mesh, rules: E.init_state(spec, mesh, rules), spec, (),
                                    detail="empty state")()

    def _place(self, x: np.ndarray, names):
        if self.mesh is None:
            return jax.device_put(x)  # (jnp.asarray would compile a tiny program per new shape)
        return jax.device_put(x, named_sharding(self.mesh, names, x.shape, self.rules))

    def _launch(self, rows, ids, sc: SampleConfig, batch_buckets, prompt_buckets, return_logits=False):
        """Dispatch one batch (asynchronously); returns the device outputs."""
        n = len(rows)
        self.stats["prefill_tokens"] += sum(len(ids[i]) for i, _ in rows)
        B = pick_bucket(n, batch_buckets)
        P = pick_bucket(max(len(ids[i]) for i, _ in rows), prompt_buckets)
        pad = self.tokenizer.pad_id if self.tokenizer is not None else (self.cfg.pad_token_id or 0)
        tokens = np.full((B, P), pad, np.int32)
        kv_start = np.full((B,), P - 1, np.int32)
        seeds = np.zeros((B,), np.uint32)
        hashes = np.zeros((B,), np.uint32)
        active = np.zeros((B,), bool)
        for r, (i, j) in enumerate(rows):
            t = ids[i]
            tokens[r, P - len(t):] = t
            kv_start[r] = P - len(t)
            seeds[r] = sc.seed + j
            hashes[r] = prompt_hash(t)
            active[r] = True
        spec = Spec(
            cfg=self.cfg, batch=B, prompt_len=P, max_new=sc.max_new_tokens, greedy=sc.greedy,
            top_k=0 if sc.greedy else min(sc.top_k, self.cfg.vocab_size),
            use_top_p=(not sc.greedy) and sc.top_p < 1.0, has_stop=bool(sc.stop) and self.tokenizer is not None,
            eos_ids=self.eos_ids,
            scan_layers=self.layer_loop == "scan", has_lora=self.lora is not None, return_logits=return_logits,
            cpu_kernels=self.cpu_kernels, platform=self.platform,
        )
        b = ("batch",)
        args = (
            self.weights, self.lora, jnp.float32(self.lora_scale),
            self._place(tokens, ("batch", "length")), self._place(kv_start, b), self._place(seeds, b),
            self._place(hashes, b), self._place(active, b),
            self._stop_table(sc.stop) if spec.has_stop else None,
            jnp.float32(max(sc.temperature, 1e-6)), jnp.float32(sc.top_p),
        )
        prog = self._program_for(spec, args)
        return prog(*args)

    def _finish(self, rows, ids, outs, sc: SampleConfig) -> list[tuple[int, int, Completion]]:
        toks, ntok, finish = to_host(tuple(outs[:3]))  # (arrays may span processes: gathered to every host)
        results = []
        for r, (i, j) in enumerate(rows):
            k = int(ntok[r])
            results.append((i, j, self._completion([int(t) for t in toks[r, :k]], int(finish[r]), sc, j)))
        if rows:  # decode-slot occupancy: tokens of the decode steps over slots x steps
            steps = int(ntok[: len(rows)].max()) - 1
            self.stats["slot_steps"] += steps * len(ntok)
            self.stats["live_slot_steps"] += int(np.maximum(ntok[: len(rows)] - 1, 0).sum())
        return results

    def _completion(self, gen: list[int], code: int, sc: SampleConfig, j: int) -> Completion:
        return completion(self.tokenizer, gen, code, sc, j)

    # -- public API

    def stream(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        sample_cfg: SampleConfig | None = None,
        progress: bool = True,
        skip: set[tuple[int, int]] | None = None,
        desc: str = "generate",
    ) -> Iterator[tuple[int, int, Completion]]:
        """Yield ``(prompt_index, sample_index, Completion)`` as each batch finishes (rows sorted by
        prompt length, longest first; order within a prompt is not guaranteed). ``skip``: (prompt,
        sample) pairs not to generate (resuming)."""
        sc = sample_cfg or SampleConfig()
        ids = self._fit(self.encode(prompts), sc)
        skip = skip or set()
        rows = [(i, j) for i in range(len(ids)) for j in range(sc.n) if (i, j) not in skip]
        rows.sort(key=lambda r: (-len(ids[r[0]]), r[0], r[1]))
        dp = self.data_parallel
        batch_buckets = sc.batch_buckets or doubling_buckets(round_up(sc.batch_size, dp), start=dp)
        if any(b % dp for b in batch_buckets):
            raise UserError(f"batch buckets {batch_buckets} must be multiples of the data-parallel size {dp}")
        bs = max(batch_buckets) if sc.batch_buckets else sc.batch_size
        limit = self.max_prompt_len(sc)
        prompt_buckets = tuple(sorted(sc.prompt_buckets)) if sc.prompt_buckets else doubling_buckets(limit)
        if max(prompt_buckets) < max((len(t) for t in ids), default=0):
            raise UserError(f"prompt buckets {prompt_buckets} do not cover the longest prompt")
        bar = None
        if progress and rows:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), unit="seq", desc=desc, dynamic_ncols=True)
        t0 = time.perf_counter()
        c0 = self.compile_seconds
        tokens = 0
        try:
            if self.engine == "continuous":
                eng = Engine(self, sc, ids, rows, batch_buckets, prompt_buckets, bs)
                for i, j, gen, code in eng.run():
                    c = self._completion(gen, code, sc, j)
                    tokens += c.num_tokens
                    self.stats["rows"] += 1
                    self.stats["tokens"] += c.num_tokens
                    if bar is not None:
                        bar.update(1)
                        el = time.perf_counter() - t0 - (self.compile_seconds - c0)
                        bar.set_postfix(tok_s=f"{tokens / max(el, 1e-9):.1f}", programs=self.num_compiled,
                                        occupancy=f"{self.occupancy:.2f}")
                    yield i, j, c
                return
            batches = [rows[k:k + bs] for k in range(0, len(rows), bs)]
            pending = None
            for k in range(len(batches) + 1):
                launched = None
                if k < len(batches):
                    launched = self._launch(batches[k], ids, sc, batch_buckets, prompt_buckets)
                if pending is not None:
                    res = self._finish(pending[0], ids, pending[1], sc)
                    n_tok = sum(c.num_tokens for _, _, c in res)
                    tokens += n_tok
                    self.stats["rows"] += len(res)
                    self.stats["tokens"] += n_tok
                    if bar is not None:
                        bar.update(len(res))
                        el = time.perf_counter() - t0 - (self.compile_seconds - c0)
                        bar.set_postfix(tok_s=f"{tokens / max(el, 1e-9):.1f}", programs=self.num_compiled)
                    yield from res
                pending = (batches[k], launched) if launched is not None else None
        finally:
            self.stats["seconds"] += time.perf_counter() - t0 - (self.compile_seconds - c0)
            if bar is not None:
                bar.close()

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        sample_cfg: SampleConfig | None = None,
        progress: bool = True,
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, ``result[i][j]`` = sample ``j`` (seed ``seed + j``) of prompt ``i``."""
        sc = sample_cfg or SampleConfig()
        out: list[list[Completion | None]] = [[None] * sc.n for _ in prompts]
        for i, j, c in self.stream(prompts, sc, progress=progress):
            out[i][j] = c
        return out  # type: ignore[return-value]

    def generate_with_logits(self, prompts, sample_cfg: SampleConfig) -> list[tuple[Completion, np.ndarray]]:
        """One completion per prompt (``n`` ignored) with the float32 logits each generated token was
        drawn from, ``[num_tokens, V]`` (before temperature/top-k/top-p), from this Sampler's engine.
        For tests and debugging (the logits of every slot come back to the host)."""
        sc = sample_cfg.replace(n=1, batch_size=max(len(prompts), 1))
        ids = self._fit(self.encode(prompts), sc)
        rows = [(i, 0) for i in range(len(ids))]
        prompt_buckets = sc.prompt_buckets or doubling_buckets(self.max_prompt_len(sc))
        dp = self.data_parallel
        batch_buckets = sc.batch_buckets or doubling_buckets(round_up(len(ids), dp), start=dp)
        if self.engine == "continuous":
            eng = Engine(self, sc, ids, rows, batch_buckets, tuple(sorted(prompt_buckets)), max(batch_buckets),
                         return_logits=True)
            done = {i: self._completion(gen, code, sc, j) for i, j, gen, code in eng.run()}
            return [(done[i], eng.logits[(i, 0)]) for i in range(len(ids))]
        outs = self._launch(rows, ids, sc, batch_buckets, prompt_buckets, return_logits=True)
        res = self._finish(rows, ids, outs, sc)
        logits = to_host(outs[3])
        return [(c, logits[r, : c.num_tokens]) for r, (_, _, c) in enumerate(res)]
