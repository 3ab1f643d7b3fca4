"""``w2s run``: the weak-to-strong pipeline from a config, resumable stage by stage (:mod:`w2s_jax.pipeline.run`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from w2s_jax.core.config import to_dict
from w2s_jax.parallel import distributed
from w2s_jax.pipeline.run import STAGE_NAMES, default_out, load_run_config, run_pipeline


def main(argv: list[str], prog: str = "w2s run", command: str = "run") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="run the weak-to-strong experiment from one config, "
                                 "resumable stage by stage")
    ap.add_argument("config", nargs="?", help="YAML config file, or the name of a packaged config: default "
                    "(SmolLM2-135M-Instruct strong, fetched on first use) or smoke (small byte-level models, offline)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (dotted key), repeatable")
    ap.add_argument("--out", help="run directory (default: runs/<name>)")
    ap.add_argument("--from", dest="from_stage", help=f"re-run from this stage ({', '.join(STAGE_NAMES)})")
    ap.add_argument("--until", help="stop after this stage")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(argv)
    cfg = load_run_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    out = Path(args.out) if args.out else default_out(cfg)
    res = run_pipeline(cfg, out=out, from_stage=args.from_stage, until=args.until)
    if res is not None and distributed.is_main_process():
        print(f"\n[w2s] results: {out / 'results.md'}", file=sys.stderr)
    return 0
