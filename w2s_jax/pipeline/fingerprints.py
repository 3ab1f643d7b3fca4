"""The stages of ``w2s run``, what each reads and depends on, and their fingerprints.

A stage's fingerprint hashes the config sections it reads plus its dependencies' fingerprints, so a
changed config re-runs exactly the stages it affects and everything downstream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from w2s_jax.core.config import to_dict
from w2s_jax.pipeline.config import RunConfig

__all__ = ["Stage", "STAGES", "STAGE_NAMES", "get_key", "has_key", "stage_fingerprints"]


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    keys: tuple[str, ...]  # config sections (dotted) the stage reads
    fn: str  # method name on Pipeline (w2s_jax/pipeline/stages.py)


STAGES: tuple[Stage, ...] = (
    Stage("data", (), ("data",), "stage_data"),
    Stage("weak_model", ("data",), ("weak", "weak_train", "mesh"), "stage_weak_model"),
    Stage("strong_model", ("data",), ("strong", "mesh"), "stage_strong_model"),
    Stage("weak_labels", ("data", "weak_model"), ("generation", "grading"), "stage_weak_labels"),
    Stage("strong_icl", ("weak_labels", "strong_model"),
          ("generation", "grading", "stage1.n_demos", "stage1.demo_seed", "stage1.demos"), "stage_strong_icl"),
    Stage("stage1", ("weak_labels", "strong_icl", "strong_model"), ("stage1", "strong_train", "generation", "grading"),
          "stage_stage1"),
    Stage("full_weak", ("weak_labels", "strong_model"), ("strong_train", "baselines.full_weak"),
          "stage_full_weak"),
    Stage("gold", ("data", "strong_model"), ("strong_train", "baselines.gold"), "stage_gold"),
    Stage("sampling", ("stage1", "weak_labels"), ("stage2.n_samples", "stage2.temperature", "stage2.top_p",
                                                  "stage2.seed", "stage2.max_new_tokens", "stage2.pair_seed",
                                                  "generation", "grading"), "stage_sampling"),
    Stage("stage2", ("sampling", "stage1"), ("stage2.train",), "stage_stage2"),
    Stage("eval", ("weak_model", "strong_icl", "stage1", "full_weak", "gold", "stage2"),
          ("generation", "grading", "baselines", "pass_k", "eval_samples", "stage2.temperature", "stage2.top_p",
           "stage2.seed"), "stage_eval"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_key(cfg_dict: dict, dotted: str) -> Any:
    """The value at a dotted key of a nested dict (KeyError when absent)."""
    cur: Any = cfg_dict
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def stage_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """Each stage's fingerprint: the config sections it reads and its dependencies' fingerprints, hashed."""
    d = to_dict(cfg)
    fps: dict[str, str] = {}
    for st in STAGES:
        payload = {
            "stage": st.name,
            "keys": {k: get_key(d, k) for k in st.keys},
            "deps": {dep: fps[dep] for dep in st.deps},
        }
        fps[st.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return fps


def has_key(d: dict, dotted: str) -> bool:
    try:
        get_key(d, dotted)
        return True
    except (KeyError, TypeError):
        return False
