"""Time of one decode step of the two generation engines, with and without the native CPU kernels.

Random SmolLM2-135M-shaped weights (float32), ``--batch`` prompts of ``--prompt-len`` random tokens,
EOS off, so every row decodes ``--new-tokens`` tokens: the step time is (time of a run with
``--new-tokens`` - time of a run with 1 new token) / (``--new-tokens`` - 1), compilation excluded,
median of ``--repeats`` runs. Four Samplers in one process: static and continuous engines, each with
``cpu_kernels`` on (the native matmul and decode-attention kernels) and off (XLA's dot and masked
attention). The cache holds ``prompt bucket + new tokens`` slots, so ``--prompt-len 100`` gives 256
slots and ``--prompt-len 200`` 384.

    python benchmarks/bench_decode_step.py [--prompt-len 100] [--new-tokens 128] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from w2s_jax.tools.bench import cpu_name  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from w2s_jax.infer.sampler import SampleConfig, Sampler
    from w2s_jax.models.config import get_preset
    from w2s_jax.models.params import init_params

    cfg = get_preset("smollm2-135m")
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 5000, args.prompt_len).tolist() for _ in range(args.batch)]
    samplers = {(e, k): Sampler(params, cfg, None, eos_ids=[], engine=e, cpu_kernels=k)
                for e in ("static", "continuous") for k in (False, True)}
    print(f"{cfg.name}: random weights, batch {args.batch}, prompts of {args.prompt_len} tokens, "
          f"{args.new_tokens} new; {os.cpu_count()} CPUs ({cpu_name()}), jax {jax.__version__}", flush=True)

    def run(s, n):
        sc = SampleConfig(max_new_tokens=n, temperature=args.temperature, seed=0, batch_size=args.batch)
        c0 = s.compile_seconds
        t0 = time.perf_counter()
        s.generate(prompts, sc, progress=False)
        return time.perf_counter() - t0 - (s.compile_seconds - c0)

    for s in samplers.values():  # compile
        run(s, args.new_tokens)
        run(s, 1)
    steps = {key: [] for key in samplers}
    for _ in range(args.repeats):
        for key, s in samplers.items():
            steps[key].append((run(s, args.new_tokens) - run(s, 1)) / (args.new_tokens - 1) * 1e3)
    for e in ("static", "continuous"):
        off, on = (statistics.median(steps[(e, k)]) for k in (False, True))
        print(f"{e}: {off:.1f} ms/step with XLA's dot and attention, {on:.1f} with the native kernels "
              f"-> {off / on:.2f}x", flush=True)


if __name__ == "__main__":
    main()
