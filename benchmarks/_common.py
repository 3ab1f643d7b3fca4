"""Helpers shared by the benchmark scripts: peak resident memory, machine-wide CPU load, timing."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from w2s_jax.core.hostmem import tune_host_malloc  # noqa: E402

# both frameworks run in this process, so both get the same allocator (w2s_jax/core/hostmem.py); the
# scripts import this module before JAX or torch start their thread pools
HOST_MALLOC = "reuse" if tune_host_malloc() else "system"


def openmp_passive() -> str:
    """Let torch's idle OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE`` unless set).

    The training benchmarks run a JAX step and a torch step in turn in one process. With libgomp's
    default wait policy the JAX SFT step took 5.57 to 5.67 s interleaved with torch against 5.28 s
    alone; with PASSIVE it takes 5.23 s interleaved, while torch's own step is unchanged (5.50 to 5.51 s
    default and alone, 5.53 s passive; 2026-11-26, 2-core AMD EPYC). Must run before torch is imported;
    returns the policy in effect. The generation benchmark keeps torch's default (many small
    parallel regions per token, where sleeping threads could cost torch wake-ups)."""
    return os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """Peak resident memory of this process inside the block (sampled every 5 ms): ``peak``, and
    ``growth`` above the level at entry."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (Linux /proc/stat)."""
    try:
        f = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = f[3] + (f[4] if len(f) > 4 else 0.0)
    return (sum(f) - idle) / hz, sum(f) / hz


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait`` s) until the machine is less than ``threshold`` busy over 2 s;
    returns the last measured busy fraction."""
    t_end = time.time() + max_wait
    while True:
        b0, t0 = cpu_times()
        time.sleep(2.0)
        b1, t1 = cpu_times()
        frac = (b1 - b0) / max(t1 - t0, 1e-9)
        if frac < threshold or time.time() >= t_end:
            return frac


def timed(fn, wait: float = 0.0) -> tuple[float, float]:
    """Run ``fn()``: (wall seconds, fraction of the machine's CPU used by *other* processes meanwhile)."""
    if wait > 0:
        wait_quiet(wait)
    b0, t0 = cpu_times()
    p0 = time.process_time()
    w0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - w0
    b1, t1 = cpu_times()
    own = time.process_time() - p0
    return wall, max(0.0, (b1 - b0) - own) / max(t1 - t0, 1e-9)


def preference_rows(toks, prompt: int) -> dict:
    """Preference-batch arrays for ``toks [..., S]`` (chosen and rejected rows sharing a ``prompt``-token
    prefix): next-token targets, the completion mask the DPO loss uses, the NLL mask (every position but
    the last), segment ids and positions, in ``train.abstract_batch`` layout."""
    S = toks.shape[-1]
    tg = np.zeros_like(toks)
    tg[..., :-1] = toks[..., 1:]
    lm = np.zeros(toks.shape, np.float32)
    lm[..., prompt - 1: S - 1] = 1.0
    nll = np.ones(toks.shape, np.float32)
    nll[..., -1] = 0
    return {"tokens": toks, "targets": tg, "loss_mask": lm, "segment_ids": np.ones(toks.shape, np.int32),
            "positions": np.broadcast_to(np.arange(S, dtype=np.int32), toks.shape).copy(), "nll_mask": nll}


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _to_torch(a, device, dtype):
    import jax.numpy as jnp
    import torch

    if device == "cuda":  # zero host round trip; clone so JAX donation cannot touch it
        return torch.from_dlpack(a).to(dtype).clone()
    return torch.from_numpy(np.array(a.astype(jnp.float32), order="C", copy=True)).to(dtype)


def torch_model(cfg, params, device: str, dtype: str):
    """``LlamaForCausalLM`` holding a copy of ``params`` (layout from ``w2s_jax.io.hf``), on ``device``
    (cuda: copied device to device) in ``dtype`` (``float32`` | ``bfloat16``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from w2s_jax.io.hf import model_to_hf_config, params_to_state_dict

    torch.set_num_threads(os.cpu_count() or 1)
    hc = model_to_hf_config(cfg)
    hc._attn_implementation = "sdpa"
    dt = torch_dtype(dtype)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hc, dtype=dt)
    sd = {k: _to_torch(v, device, dt).contiguous() for k, v in params_to_state_dict(params, cfg, host=False).items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd, assign=True, strict=False)
    if cfg.tie_embeddings:
        m.tie_weights()
    m.model.rotary_emb.__init__(hc)  # non-persistent inv_freq buffer, off the meta device
    return m.to(device)
