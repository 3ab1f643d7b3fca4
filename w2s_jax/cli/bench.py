"""``w2s bench``: the benchmark suite against the PyTorch baselines (``tools/bench.py``)."""

from __future__ import annotations

import argparse

from w2s_jax.tools.bench import WORKLOADS, BenchOptions, run_suite

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "w2s bench", command: str = "bench") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description="The benchmark suite against the PyTorch baselines, one table and one JSON.")
    ap.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, few rounds (smoke test, not figures)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--profile", default=None, metavar="DIR", help="write JAX profiler traces (TensorBoard) here")
    ap.add_argument("--preset", default=None, help="model shape (default smollm2-135m for cpu, llama2-7b for gpu); "
                                                   "`tiny` for a smoke test")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per workload")
    args = ap.parse_args(argv)
    opts = BenchOptions(
        mode=args.mode, quick=args.quick, only=[w.strip() for w in args.only.split(",") if w.strip()],
        out=args.out, profile=args.profile, preset=args.preset, layers=args.layers, batch=args.batch, seq=args.seq,
        rounds=args.rounds,
    )
    return run_suite(opts)
