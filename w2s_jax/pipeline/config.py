"""The config of ``w2s run``: :class:`RunConfig` and its sections, loading and the checks that fail fast.

``load_run_config`` reads a YAML file (or a packaged config by name: ``default``, ``smoke``) plus dotted
``--set`` overrides, expands ``~`` in paths and runs :func:`validate` before any long work.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from w2s_jax.core.config import load_config
from w2s_jax.core.errors import UserError
from w2s_jax.infer.sampler import SampleConfig
from w2s_jax.method.grading import MODES
from w2s_jax.method.prompts import STOP_STRINGS
from w2s_jax.method.splits import DataConfig, SyntheticConfig
from w2s_jax.method.tasks import get_task
from w2s_jax.parallel.sharding import MeshConfig
from w2s_jax.pipeline.model_spec import ModelSpec, check_model_spec
from w2s_jax.train.loop import TrainConfig

__all__ = ["PretrainConfig", "RunModelSpec", "Stage1Config", "Stage2Config", "BaselinesConfig", "RunConfig",
           "PACKAGE_CONFIGS", "default_config_path", "config_path", "load_run_config", "validate"]

PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class PretrainConfig:
    """Demo only: give a from-scratch strong model latent skill by training it on a generated pool
    disjoint from train_1/train_2/test (standing in for pretraining). Off when ``examples == 0``."""

    examples: int = 0
    seed: int = 1234
    # each pool example is prefixed by 0..few_shot_max solved pool examples (a document of several
    # problems, like pretraining text), so that the model also reads few-shot prompts at their length
    few_shot_max: int = 4
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RunModelSpec(ModelSpec):
    """A model of the run (``weak``, ``strong``): where it comes from (:class:`ModelSpec`: ``path`` or
    ``preset``, ``overrides``, ``tokenizer``, ``base``, ``seed``) and how the run treats it."""

    trained: bool = False  # weak model only: `path` is already fine-tuned on train_1 (skip weak SFT)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class Stage1Config:
    train_set: str = "hybrid"  # hybrid | weak | icl: the set the final Stage I model is trained on
    # round-1 models trained side by side and evaluated on test (the paper's Stage I table); round 2
    # needs `weak` and `icl` (its labellers); `train_set` must be one of them
    variants: list[str] = field(default_factory=lambda: ["weak", "icl", "hybrid"])
    rounds: int = 1  # 2 = the paper's second iteration (GSM8K, OlympicArena)
    # MATH as released: after the agreeing questions, append disagreeing ones (both completions) up to
    # this many questions (0 = off)
    pad_to: int = 0
    n_demos: int = 4
    demo_seed: int = 42
    # where the ICL demonstrations come from: `weak` = the weak model's own train_2 outputs, seed-42
    # shuffle, first n_demos with the answer key (the paper; reads no gold); `correct` = the same, but
    # only gold-correct outputs (ablation: reads train_2 gold); `train_1_gold` = gold solutions of
    # train_1; `file:PATH` = a plain-text template of `Question: ... Answer: ...` blocks
    demos: str = "weak"
    # the Stage I SFT's own settings (default: strong_train). Its set (the agreeing questions) is often a few
    # dozen examples, far smaller than the full-weak and gold sets that strong_train is sized for
    train: TrainConfig | None = None


@dataclass
class Stage2Config:
    n_samples: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # sample j uses seed + j (the paper: seeds 0..9)
    max_new_tokens: int | None = None  # default: generation.max_new_tokens
    pair_seed: int = 42
    train: TrainConfig = field(default_factory=lambda: TrainConfig(loss_type="sigmoid"))


@dataclass
class BaselinesConfig:
    full_weak: bool = True
    gold: bool = True  # strong model fine-tuned on train_2 gold: the PGR ceiling
    strong_zero_shot: bool = True
    strong_icl: bool = True  # the strong model with the few-shot prompt on test (its train_2 accuracy is reported)


@dataclass
class RunConfig:
    name: str = "w2s"
    data: DataConfig = field(default_factory=DataConfig)
    weak: RunModelSpec = field(default_factory=RunModelSpec)
    strong: RunModelSpec = field(default_factory=RunModelSpec)
    weak_train: TrainConfig = field(default_factory=TrainConfig)  # weak model SFT on train_1 gold
    strong_train: TrainConfig = field(default_factory=TrainConfig)  # Stage I, full weak FT, gold ceiling
    generation: SampleConfig = field(default_factory=lambda: SampleConfig(stop=STOP_STRINGS))  # labels and eval
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    grading: str = "paper"  # paper | symbolic
    pass_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    # test-set pass@k of the Stage I and Stage II models: this many samples per test question at
    # stage2.temperature / top_p (seeds stage2.seed + j), as the paper reports; 0 = off
    eval_samples: int = 10


def default_config_path() -> Path:
    return PACKAGE_CONFIGS / "default.yaml"


def config_path(name_or_path: str | None) -> Path:
    """A config file, or the name of a packaged one (``default``, ``smoke``); None = the default."""
    if name_or_path is None:
        return default_config_path()
    p = Path(name_or_path)
    packaged = PACKAGE_CONFIGS / f"{name_or_path}.yaml"
    if not p.exists() and "/" not in str(name_or_path) and packaged.is_file():
        return packaged
    return p


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    cfg = load_config(RunConfig, str(config_path(path)), list(overrides))
    _expand_paths(cfg)
    validate(cfg)
    return cfg


def _expand_paths(cfg: RunConfig) -> None:
    """``~`` in model and data paths means the user's home, as in a shell."""
    for spec in (cfg.weak, cfg.strong):
        for key in ("path", "base", "tokenizer"):
            v = getattr(spec, key)
            if isinstance(v, str) and v.startswith("~"):
                setattr(spec, key, os.path.expanduser(v))
    for key in ("train", "train_1", "train_2", "test"):
        v = getattr(cfg.data, key)
        if isinstance(v, str) and v.startswith("~"):
            cfg.data = dataclasses.replace(cfg.data, **{key: os.path.expanduser(v)})


def validate(cfg: RunConfig) -> None:
    """Checks that fail fast, before any long work."""
    get_task(cfg.data.task)
    if cfg.grading not in MODES:
        raise UserError(f"config key `grading`: unknown mode `{cfg.grading}` (choose from {', '.join(MODES)})")
    if cfg.stage1.train_set not in ("hybrid", "weak", "icl"):
        raise UserError(f"config key `stage1.train_set`: `{cfg.stage1.train_set}` is not hybrid, weak or icl")
    s1 = cfg.stage1
    if not (s1.demos in ("weak", "correct", "train_1_gold") or s1.demos.startswith("file:")):
        raise UserError(f"config key `stage1.demos`: `{s1.demos}` is not weak, correct, train_1_gold or file:PATH")
    if s1.demos.startswith("file:") and not Path(s1.demos[5:]).expanduser().is_file():
        raise UserError(f"config key `stage1.demos`: demonstration file {s1.demos[5:]} does not exist")
    if s1.rounds not in (1, 2):
        raise UserError(f"config key `stage1.rounds` must be 1 or 2 (got {s1.rounds})")
    bad = [v for v in s1.variants if v not in ("hybrid", "weak", "icl")]
    if bad or not s1.variants or len(set(s1.variants)) != len(s1.variants):
        raise UserError(f"config key `stage1.variants`: {s1.variants} must be distinct names from hybrid, weak, icl")
    if s1.train_set not in s1.variants:
        raise UserError(f"config key `stage1.variants`: {s1.variants} must include stage1.train_set `{s1.train_set}`")
    if s1.rounds == 2 and not {"weak", "icl"} <= set(s1.variants):
        raise UserError(f"config key `stage1.variants`: round 2 labels with the round-1 weak-ft and icl-ft models, "
                        f"so the variants must include weak and icl (got {s1.variants})")
    if s1.pad_to < 0:
        raise UserError(f"config key `stage1.pad_to` must be >= 0 (got {s1.pad_to})")
    for key, v in (("stage1.n_demos", cfg.stage1.n_demos), ("stage2.n_samples", cfg.stage2.n_samples)):
        if v < 1:
            raise UserError(f"config key `{key}` must be >= 1 (got {v})")
    if cfg.stage2.max_new_tokens is not None and cfg.stage2.max_new_tokens < 1:
        raise UserError(f"config key `stage2.max_new_tokens` must be >= 1 or null (got {cfg.stage2.max_new_tokens})")
    for role in ("weak", "strong"):
        check_model_spec(getattr(cfg, role), role)
    d = cfg.data
    for key in ("train", "train_1", "train_2", "test"):
        p = getattr(d, key)
        if d.source == "local" and p is not None and "://" not in p and not Path(p).exists():
            raise UserError(f"config key `data.{key}`: file {p} does not exist")
    if cfg.weak.trained and cfg.weak.path is None:
        raise UserError("config key `weak.trained` needs `weak.path`")
