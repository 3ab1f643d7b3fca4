"""The weak-to-strong experiment from one config, resumable stage by stage (``w2s run``).

The Python API::

    from w2s_jax.pipeline.run import run_pipeline
    results = run_pipeline("smoke", ["data.n_test=20"], out="runs/smoke")

or, step by step, ``Pipeline(load_run_config(path, overrides), out).run(from_stage=..., until=...)``.
The config: :mod:`w2s_jax.pipeline.config`; the stages: :mod:`w2s_jax.pipeline.stages`; their
fingerprints: :mod:`w2s_jax.pipeline.fingerprints`; the reports: :mod:`w2s_jax.pipeline.report`.

Multi-host: every host runs the same command with the same run directory, which must be on a file
system all hosts share (checked at start).
"""

from __future__ import annotations

from pathlib import Path

from w2s_jax.pipeline.config import RunConfig, load_run_config, validate
from w2s_jax.pipeline.fingerprints import STAGE_NAMES
from w2s_jax.pipeline.stages import Pipeline

__all__ = ["RunConfig", "Pipeline", "run_pipeline", "load_run_config", "default_out", "STAGE_NAMES"]


def default_out(cfg: RunConfig) -> Path:
    """The run directory when none is given: ``runs/<name>``."""
    return Path("runs") / cfg.name


def run_pipeline(config: str | RunConfig | None = None, overrides: list[str] = (), out: str | Path | None = None,
                 from_stage: str | None = None, until: str | None = None) -> dict | None:
    """Run (or resume) the pipeline; returns results.json's content when eval ran."""
    cfg = config if isinstance(config, RunConfig) else load_run_config(config, overrides)
    if isinstance(config, RunConfig):
        validate(cfg)
    out = Path(out) if out is not None else default_out(cfg)
    return Pipeline(cfg, out).run(from_stage=from_stage, until=until)
