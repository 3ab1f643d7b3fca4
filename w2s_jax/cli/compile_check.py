"""``w2s compile-check CONFIG --topology v5p-128``: the ahead-of-time fit check of a TPU slice
(``tools/compile_check.py``)."""

from __future__ import annotations

import argparse

from w2s_jax.tools.compile_check import STAGES, run_check

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "w2s compile-check", command: str = "compile-check") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description="Will this config fit on that TPU slice, and how fast? Compiles its SFT and DPO steps "
                               "and the generation programs for a TPU topology and reports memory, FLOPs and times "
                               "per chip; exit status 1 when a stage does not fit.")
    ap.add_argument("config", help="compile-check YAML (configs/tpu/*.yaml) or a `w2s run` config")
    ap.add_argument("--topology", required=True,
                    help="gcloud accelerator type (v5p-128, v5litepod-16, v6e-8, v4-32) or libtpu topology (v5p:4x4x4)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (dotted for nested keys); repeatable")
    ap.add_argument("--stages", default=None, help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--no-xla-costs", action="store_true",
                    help="skip the 0- and 2-layer compiles that extrapolate XLA's FLOPs/bytes to all layers")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    report = run_check(args.config, args.topology, args.overrides, stages=stages,
                       xla_costs=not args.no_xla_costs, json_out=args.json_out)
    return 0 if report.fits else 1
