"""``w2s sft`` and ``w2s dpo``: train from a YAML config plus dotted ``--set key=value`` overrides.

The config (sections ``model``, ``data``, ``train``, ``mesh``, ``out_dir``, ``export_hf``) and the job
are in :mod:`w2s_jax.pipeline.train_job`; re-running the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging

from w2s_jax.core.config import load_config
from w2s_jax.parallel import distributed
from w2s_jax.pipeline.train_job import TrainRunConfig, run_train_job


def main(argv: list[str] | None = None, prog: str = "w2s sft", command: str = "sft") -> int:
    kind = "dpo" if command == "dpo" else "sft"
    ap = argparse.ArgumentParser(
        prog=prog,
        description=("supervised fine-tuning" if kind == "sft" else "preference optimisation (DPO, IPO, hinge, "
                     "ORPO, SimPO)") + " from a YAML config; re-running resumes from the last checkpoint",
    )
    ap.add_argument("--config", required=False, help="YAML config (sections: model, data, train, mesh, out_dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, e.g. --set train.lr=1e-5 (repeatable)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    cfg: TrainRunConfig = load_config(TrainRunConfig, args.config, args.overrides)
    summary = run_train_job(cfg, kind, prog)
    if distributed.is_main_process():
        print(summary)
    return 0
