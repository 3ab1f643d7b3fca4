"""Training metrics to a plain ``metrics.jsonl`` and to TensorBoard (tensorboardX).

One JSON object per line: ``{"step": 10, "split": "train", "loss": ..., "lr": ..., ...}``;
TensorBoard tags are ``<split>/<name>`` (``train/rewards/chosen``). On resume the file keeps only
the records up to the restored step, so the log reads as one uninterrupted run. In a multi-host run
only process 0 writes (elsewhere the logger touches no file and ``log`` does nothing).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from w2s_jax.parallel.distributed import is_main_process


def _clean(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


class MetricsLogger:
    """``enabled``: write at all (default: on the main process only, see ``distributed.is_main_process``)."""

    def __init__(self, out_dir: str | os.PathLike, *, tensorboard: bool = True, resume_step: int | None = None,
                 enabled: bool | None = None):
        self.dir = Path(out_dir)
        self.path = self.dir / "metrics.jsonl"
        if enabled is None:
            enabled = is_main_process()
        self.enabled = bool(enabled)
        self._f = None
        self._tb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a partial last line of a killed run
                if resume_step is not None and int(rec.get("step", 0)) <= resume_step:
                    keep.append(line)
            self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        self._f = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1
                                         if resume_step is not None else None)
            except ImportError:  # pragma: no cover
                self._tb = None

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        if self._f is None:
            return
        rec = {"step": int(step), "split": split, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | os.PathLike, split: str | None = None) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if split is None or rec.get("split") == split:
                out.append(rec)
    return out
