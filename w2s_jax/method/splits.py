"""The data section of a run: where the task data comes from and the ``train_1`` / ``train_2`` / ``test``
splits it describes.

:class:`DataConfig` (with :class:`SyntheticConfig` for generated data) is the ``data:`` section of
``w2s run`` and the config of ``w2s data split``; :func:`load_splits` turns it into canonical records
(loaders in :mod:`w2s_jax.method.tasks`, generators in :mod:`w2s_jax.method.synth`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from w2s_jax.core.config import dump_yaml
from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import write_jsonl_atomic
from w2s_jax.method.synth import make_arith, make_gsm_symbolic, make_synthetic
from w2s_jax.method.tasks import TASKS, get_task, load_hf, load_local, load_tfds, split_train, to_records

__all__ = ["SyntheticConfig", "DataConfig", "load_splits", "make_synthetic_splits", "write_splits", "SPLIT_FILES"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Generated GSM8K-style data (``data.source=synthetic``; see :mod:`w2s_jax.method.synth`)."""

    kind: Literal["arith", "gsm_symbolic", "basic_arithmetic"] = "arith"
    min_steps: int = 1  # arith: operations per problem
    max_steps: int = 2
    max_value: int = 20  # arith: operands drawn from 1..max_value
    ops: tuple[str, ...] = ("add", "sub", "mul")  # arith: operations used
    difficulty: float = 1.0  # gsm_symbolic difficulty


@dataclass(frozen=True)
class DataConfig:
    """Where the task data comes from and how ``train`` is split into ``train_1``/``train_2``.

    ``source``: ``local`` (JSONL/JSON paths), ``hf`` (Hugging Face ``datasets``: local paths through
    the ``json`` builder, or ``hf_name``/``hf_config`` from the hub), ``tfds`` (tensorflow-datasets
    ``gsm8k``) or ``synthetic`` (generated). With ``train_1``/``train_2`` given, they are used as they
    are; otherwise ``train`` is split with ``seed`` into ``n_train_1``/``n_train_2`` (default: halves).
    For ``synthetic``, missing sizes default to 1000 / 1000 / 200.
    """

    task: str = "gsm8k"
    source: Literal["local", "hf", "tfds", "synthetic"] = "local"
    train: str | None = None
    train_1: str | None = None
    train_2: str | None = None
    test: str | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    hf_train_split: str = "train"
    hf_test_split: str = "test"
    n_train_1: int | None = None
    n_train_2: int | None = None
    n_test: int | None = None
    seed: int = 42
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            close = difflib.get_close_matches(self.task, TASKS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ValueError(f"unknown task `{self.task}`{hint}; known: {', '.join(sorted(TASKS))}")
        for k in ("n_train_1", "n_train_2", "n_test"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ValueError(f"`{k}` must be >= 0, got {v}")


def load_splits(cfg) -> dict[str, list[dict]]:
    """``{"train_1", "train_2", "test"}`` canonical records for a :class:`DataConfig`.

    Already split ``train_1``/``train_2`` files are used as they are; otherwise the full ``train`` set
    is split by :func:`split_train` (default sizes: half and half). ``n_test`` keeps the first
    ``n_test`` test records. ``source="synthetic"`` generates everything (see :mod:`w2s_jax.method.synth`).
    """
    task = get_task(cfg.task)
    src = cfg.source
    if src == "synthetic":
        if task.style != "gsm8k":
            raise UserError(f"synthetic data is GSM8K-style; set data.task=gsm8k (got `{task.name}`)")
        return make_synthetic_splits(cfg)

    def load(path_or_name: str | None, split: str) -> list[dict] | None:
        if src == "local":
            return None if path_or_name is None else load_local(path_or_name, task)
        if src == "hf":
            if path_or_name is not None:
                return load_hf(task, path_or_name)
            if cfg.hf_name is None:
                return None
            return load_hf(task, cfg.hf_name, cfg.hf_config, split)
        if src == "tfds":
            return load_tfds(task, split)
        raise UserError(f"unknown data source `{src}` (local, hf, tfds, synthetic)")

    test = load(cfg.test, cfg.hf_test_split)
    if test is None:
        raise UserError(f"data source `{src}` needs a test set (data.test or data.hf_name)")
    if cfg.train_1 is not None or cfg.train_2 is not None:
        if src != "local" and src != "hf":
            raise UserError("already split train_1/train_2 files need source local or hf")
        if cfg.train_1 is None or cfg.train_2 is None:
            raise UserError("give both data.train_1 and data.train_2 (or one full data.train to split)")
        t1, t2 = load(cfg.train_1, "train"), load(cfg.train_2, "train")
        assert t1 is not None and t2 is not None
        if cfg.n_train_1 is not None:
            t1 = t1[: cfg.n_train_1]
        if cfg.n_train_2 is not None:
            t2 = t2[: cfg.n_train_2]
    elif task.style == "olympic":  # no train_1: the weak model is used as given; train_2 = the whole set
        t1, t2 = [], load(cfg.train, cfg.hf_train_split)
        if t2 is None:
            raise UserError(f"data source `{src}` needs data.train (or data.train_2): the train_2 questions")
        if cfg.n_train_2 is not None:
            t2 = t2[: cfg.n_train_2]
    else:
        full = load(cfg.train, cfg.hf_train_split)
        if full is None:
            raise UserError(f"data source `{src}` needs data.train (full train set) or train_1/train_2")
        n1 = cfg.n_train_1 if cfg.n_train_1 is not None else len(full) // 2
        n2 = cfg.n_train_2 if cfg.n_train_2 is not None else len(full) - n1
        t1, t2 = split_train(full, n1, n2, cfg.seed)
    if cfg.n_test is not None:
        test = test[: cfg.n_test]
    ids1 = {r["id"] for r in t1}
    both = [r["id"] for r in t2 if r["id"] in ids1]
    if both:
        raise UserError(f"train_1 and train_2 share ids (e.g. {both[0]!r}); they must be disjoint")
    return {"train_1": t1, "train_2": t2, "test": test}


def make_synthetic_splits(cfg) -> dict[str, list[dict]]:
    """Canonical ``train_1``/``train_2``/``test`` generated for a :class:`DataConfig`
    with ``source=synthetic``: one stream of ``n_train_1 + n_train_2 + n_test`` items from ``seed``
    (default sizes 1000 / 1000 / 200), cut in that order; for ``arith`` all questions are distinct,
    so no test question appears in training."""
    s = cfg.synthetic
    n1 = 1000 if cfg.n_train_1 is None else cfg.n_train_1
    n2 = 1000 if cfg.n_train_2 is None else cfg.n_train_2
    nt = 200 if cfg.n_test is None else cfg.n_test
    total = n1 + n2 + nt
    if s.kind == "arith":
        raw = make_arith(total, cfg.seed, s.min_steps, s.max_steps, s.max_value, tuple(s.ops))
    elif s.kind == "gsm_symbolic":
        raw = make_gsm_symbolic(total, cfg.seed, s.difficulty)
    else:
        raw = make_synthetic(s.kind, total, cfg.seed)
    recs = to_records(cfg.task, raw, f"synthetic:{s.kind}")
    return {"train_1": recs[:n1], "train_2": recs[n1 : n1 + n2], "test": recs[n1 + n2 :]}


SPLIT_FILES = ("train_1.jsonl", "train_2.jsonl", "test.jsonl", "data_config.yaml")


def write_splits(cfg: DataConfig, out_dir: str | Path) -> dict[str, list[dict]]:
    """Load the splits of ``cfg`` and write them as ``SPLIT_FILES`` in ``out_dir`` (the config last)."""
    splits = load_splits(cfg)
    out = Path(out_dir)
    for name in ("train_1", "train_2", "test"):
        write_jsonl_atomic(out / f"{name}.jsonl", splits[name])
    dump_yaml(cfg, out / "data_config.yaml")
    return splits
