"""`w2s run`: the whole weak-to-strong experiment from one config, resumable stage by stage.

Stages (each writes its artifacts plus ``stages/<name>.json``: fingerprint, inputs, counts, timings)::

    data          load or generate the task; train_1 / train_2 / test
    weak_model    fine-tune the weak model on train_1 gold (or load a given checkpoint)
    strong_model  load the strong base model (or build it: the demo "pretrains" it on a disjoint pool)
    weak_labels   weak model answers train_2 zero-shot (greedy)
    strong_icl    strong model answers train_2 with 4 few-shot demonstrations (seed 42)
    stage1        consistency filter, SFT of the strong model (optional second round)
    full_weak     baseline: the strong model fine-tuned on all weak labels
    gold          ceiling: the strong model fine-tuned on train_2 gold (when enabled)
    sampling      n samples per train_2 question from the Stage I model, votes, contrastive pairs
    stage2        DPO / ORPO (etc.) from the Stage I model
    eval          every model on test (greedy); results.json, results.md, results.png

A stage's fingerprint hashes the config sections it reads plus its inputs' fingerprints, so a
changed config re-runs exactly the stages it affects and everything downstream. A finished stage
with the same fingerprint is skipped; an interrupted one continues (training resumes from its
last checkpoint, generation skips ids already written).

Multi-host: every host runs the same command with the same run directory, which must be on a file
system all hosts share (checked at start). Process 0 writes the data, manifests, JSONL outputs and
reports; the other processes wait at a barrier (``distributed.sync``) wherever they read what it wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from w2s_jax.core.config import DataConfig, SyntheticConfig, config_hash, dump_yaml, from_dict, load_config, to_dict
from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import read_jsonl, write_json_atomic, write_jsonl_atomic
from w2s_jax.infer.sampler import SampleConfig
from w2s_jax.method.prompts import STOP_STRINGS
from w2s_jax.parallel import distributed
from w2s_jax.parallel.sharding import MeshConfig
from w2s_jax.train.loop import TrainConfig

PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------- config


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
class ModelSpec:
    """Where a model comes from: a checkpoint ``path`` (native dir, Hugging Face dir, .gguf, PEFT
    adapter dir) or a ``preset`` initialised at random (tiny demo/test models)."""

    path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (n_layers, dtype, ...)
    tokenizer: str | None = None  # "byte" or a tokenizer dir; default: the checkpoint's own
    base: str | None = None  # base model for a PEFT adapter path
    seed: int = 0
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
    weak: ModelSpec = field(default_factory=ModelSpec)
    strong: ModelSpec = field(default_factory=ModelSpec)
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
    import os

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
    from w2s_jax.method.grading import MODES
    from w2s_jax.method.tasks import get_task

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
        spec: ModelSpec = getattr(cfg, role)
        if (spec.path is None) == (spec.preset is None):
            raise UserError(f"config key `{role}`: give exactly one of `{role}.path` or `{role}.preset`")
        if spec.path is not None and "://" not in spec.path and not Path(spec.path).exists():
            raise UserError(f"config key `{role}.path`: model path {spec.path} does not exist")
        if spec.preset is not None:
            from w2s_jax.models.config import get_preset

            get_preset(spec.preset, **spec.overrides)
    d = cfg.data
    for key in ("train", "train_1", "train_2", "test"):
        p = getattr(d, key)
        if d.source == "local" and p is not None and "://" not in p and not Path(p).exists():
            raise UserError(f"config key `data.{key}`: file {p} does not exist")
    if cfg.weak.trained and cfg.weak.path is None:
        raise UserError("config key `weak.trained` needs `weak.path`")


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]
    keys: tuple[str, ...]  # config sections (dotted) the stage reads
    fn: str  # method name on Pipeline


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


def _get(cfg_dict: dict, dotted: str) -> Any:
    cur: Any = cfg_dict
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def stage_fingerprints(cfg: RunConfig) -> dict[str, str]:
    d = to_dict(cfg)
    fps: dict[str, str] = {}
    for st in STAGES:
        payload = {
            "stage": st.name,
            "keys": {k: _get(d, k) for k in st.keys},
            "deps": {dep: fps[dep] for dep in st.deps},
        }
        fps[st.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return fps


class Pipeline:
    """Runs the stages of one config in one run directory (also the Python API: ``Pipeline(cfg, out).run()``)."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.log = log or _print_main
        self.fps = stage_fingerprints(cfg)
        self._mesh = None
        self._models: dict[str, Any] = {}

    # --------------------------------------------------------------- bookkeeping

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    @property
    def main(self) -> bool:
        """True on the process that writes (process 0; always in a single-process run)."""
        return distributed.is_main_process()

    def manifest_path(self, stage: str) -> Path:
        return self.path("stages", f"{stage}.json")

    def manifest(self, stage: str) -> dict | None:
        p = self.manifest_path(stage)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"stage manifest {p} is corrupt ({e}); delete it to re-run stage `{stage}`") from e

    def is_done(self, stage: str) -> bool:
        m = self.manifest(stage)
        return bool(m and m.get("status") == "done" and m.get("fingerprint") == self.fps[stage])

    def check_run_dir(self) -> None:
        """A run directory made by a different experiment is an error (stage changes are fine)."""
        prev = self.path("config.yaml")
        if not prev.exists():
            return
        import yaml

        try:
            old = yaml.safe_load(prev.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{prev}: corrupt ({str(e).splitlines()[0]}); fix or delete it, or choose another --out") \
                from None
        if not isinstance(old, dict):
            raise UserError(f"{prev}: corrupt (not a mapping of keys); fix or delete it, or choose another --out")
        for key in ("name", "data.task"):
            a = _get(old, key) if _has(old, key) else None
            b = _get(to_dict(self.cfg), key)
            if a != b:
                raise UserError(
                    f"run directory {self.out} was made by a different config ({key}: {a!r} != {b!r}); "
                    "choose another --out or delete it"
                )

    @property
    def mesh(self):
        if self._mesh is None:
            self._mesh = self.cfg.mesh.build()
        return self._mesh

    def run(self, from_stage: str | None = None, until: str | None = None) -> dict | None:
        """Run the stages holding the run directory's lock (a second run there is refused)."""
        from w2s_jax.parallel.locking import LOCK_NAME, hold

        with hold(self.out / LOCK_NAME, f"run directory {self.out}"):
            return self._run_locked(from_stage, until)

    def _run_locked(self, from_stage: str | None = None, until: str | None = None) -> dict | None:
        for s in (from_stage, until):
            if s is not None and s not in STAGE_NAMES:
                import difflib

                close = difflib.get_close_matches(s, STAGE_NAMES, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise UserError(f"unknown stage `{s}`{hint}; stages: {', '.join(STAGE_NAMES)}")
        self.check_run_dir()
        distributed.check_shared_dir(self.out, "the run directory")  # (multi-host only; after every check_run_dir)
        start = STAGE_NAMES.index(from_stage) if from_stage else 0
        stop = STAGE_NAMES.index(until) if until else len(STAGES) - 1
        if stop > 0:  # any stage past `data` may load a model
            self.resolve_weights()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.cfg, self.path("config.yaml"))
            write_json_atomic(self.path("fingerprints.json"), {"config_hash": config_hash(self.cfg), **self.fps})
        # a stage re-runs when forced (--from) or when any dependency re-ran
        rerun: set[str] = set()
        for i, st in enumerate(STAGES):
            if i > stop:
                break
            forced = i >= start and from_stage is not None
            stale = forced or not self.is_done(st.name) or any(d in rerun for d in st.deps)
            if not stale:
                self.log(f"[w2s] stage {st.name}: done (fingerprint {self.fps[st.name]}), skipping")
                continue
            rerun.add(st.name)
            self._run_stage(st, fresh=forced)
        if "eval" in rerun or self.is_done("eval"):
            return json.loads(self.path("results.json").read_text()) if self.path("results.json").exists() else None
        return None

    def _run_stage(self, st: Stage, fresh: bool) -> None:
        m = self.manifest(st.name)
        stage_dir = self.path(st.name)
        distributed.sync(f"stage {st.name}: manifest read")  # before process 0 changes it
        if m is not None and (fresh or m.get("fingerprint") != self.fps[st.name]):
            # config changed (or forced): outputs of the old run must not be mixed with the new ones
            if self.main:
                if stage_dir.exists():
                    shutil.rmtree(stage_dir)
                self.manifest_path(st.name).unlink()
            m = None
        resumed = m is not None and m.get("status") == "running"
        self.log(f"[w2s] stage {st.name}: {'resuming' if resumed else 'running'} (fingerprint {self.fps[st.name]})")
        t0, c0 = time.time(), time.process_time()
        record = {"stage": st.name, "fingerprint": self.fps[st.name], "status": "running", "started": t0,
                  "deps": {d: self.fps[d] for d in st.deps}}
        if self.main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.manifest_path(st.name), record)
        distributed.sync(f"stage {st.name}: start")
        info = getattr(self, st.fn)(stage_dir) or {}
        # cpu_seconds: this process's CPU time (all threads) in the stage; on a busy machine wall time is not
        # the stage's cost, CPU time is
        record.update(status="done", finished=time.time(), seconds=round(time.time() - t0, 2),
                      cpu_seconds=round(time.process_time() - c0, 2), **info)
        if self.main:
            write_json_atomic(self.manifest_path(st.name), record)
        distributed.sync(f"stage {st.name}: done")  # its outputs are complete for every process
        self.log(f"[w2s] stage {st.name}: done in {record['seconds']:.1f}s")

    def resolve_weights(self) -> None:
        """Model paths given as hub addresses (``hf://OWNER/REPO/FILE``) become local files, fetched into the
        cache on first use (see ``w2s_jax/io/weights.py``); fails before any stage runs when no source works.
        Fingerprints keep the address, so the same run on another machine (another cache) matches."""
        from w2s_jax.io import weights
        for role in ("weak", "strong"):
            spec: ModelSpec = getattr(self.cfg, role)
            for key in ("path", "base"):
                v = getattr(spec, key)
                if weights.is_remote(v):
                    local = weights.resolve(v, log=self.log, flag=f"{role}.{key}")
                    setattr(self.cfg, role, dataclasses.replace(getattr(self.cfg, role), **{key: local}))

    # --------------------------------------------------------------- helpers

    def _data(self, split: str) -> list[dict]:
        return read_jsonl(self.path("data", f"{split}.jsonl"))

    def _model_dir(self, name: str) -> Path:
        return self.path("models", name)

    def load_model(self, name_or_spec):
        from w2s_jax.io.native import load_model

        for spec in (self.cfg.weak, self.cfg.strong):  # a user-given checkpoint: honour its spec
            if spec.path is not None and str(name_or_spec) == spec.path:
                name_or_spec = spec
        if isinstance(name_or_spec, ModelSpec):
            spec = name_or_spec
            model = load_model(spec.path, mesh=self.mesh, rules=self.cfg.mesh.rules_table(), base=spec.base,
                               tokenizer=spec.tokenizer)
            if spec.overrides:  # runtime fields only (dtype, remat, ...); shapes come from the checkpoint
                model.cfg = model.cfg.replace(**spec.overrides)
            return model
        return load_model(str(name_or_spec), mesh=self.mesh, rules=self.cfg.mesh.rules_table())

    def _sft(self, base_dir: Path, records: list[dict], tcfg: TrainConfig, out_dir: Path, label: str) -> dict:
        from w2s_jax.train.loop import run_sft

        model = self.load_model(base_dir)
        self.log(f"[w2s] {label}: SFT on {len(records)} examples")
        res = run_sft(model, records, tcfg, out_dir, mesh=self.mesh, rules=self.cfg.mesh.rules_table())
        return {"examples": len(records), **_summary(res)}

    def _generate(self, model_dir: Path, records: list[dict], out_path: Path, label: str, *,
                  demos: list[dict] | None = None, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, max_new_tokens: int | None = None, gold_free: bool = False) -> list[dict]:
        """Answers for ``records`` (canonical task records); resumable.

        ``gold_free=False`` (test set): each output record is graded against gold (``pred``, ``gold``,
        ``result``). ``gold_free=True`` (train_2): the model never sees gold and the output records carry
        only the extracted ``pred``; the scores against gold go to a separate ``*.gold_scores.jsonl``
        next to ``out_path`` that only the reports read (:meth:`_scores`)."""
        from w2s_jax.pipeline.generation import generate_records

        scfg = dataclasses.replace(self.cfg.generation, n=n, temperature=temperature, top_p=top_p, seed=seed)
        if max_new_tokens is not None:
            scfg = dataclasses.replace(scfg, max_new_tokens=max_new_tokens)
        model = self.load_model(model_dir)
        self.log(f"[w2s] {label}: generating {len(records)} x {n}")
        kw = dict(demos=demos, grade_mode=self.cfg.grading, mesh=self.mesh, rules=self.cfg.mesh.rules_table(),
                  desc=label)
        from w2s_jax.method.grading import extract_pred, gold_answer, grade_records
        from w2s_jax.method.tasks import get_task

        task = get_task(self.cfg.data.task)
        kw["demos"] = None  # the prompts below already hold them
        prompts = {r["id"]: task.prompt(r, demos) for r in records}

        def gold_of(r: dict):
            try:
                return gold_answer(r, task)
            except KeyError:
                return None

        if not gold_free:
            inputs = [{"id": r["id"], "prompt": prompts[r["id"]], "gold": gold_of(r)} for r in records]
            return generate_records(model, inputs, scfg, out_path, grade_task=task.name, **kw)
        inputs = [{"id": r["id"], "prompt": prompts[r["id"]]} for r in records]
        recs = generate_records(model, inputs, scfg, out_path, grade_task=None, **kw)
        recs = [{**r, "pred": extract_pred(r["response"], task)} for r in recs]
        if self.main:
            write_jsonl_atomic(out_path, recs)
            gold = {r["id"]: gold_of(r) for r in records}
            graded = grade_records([{"id": r["id"], "sample": r.get("sample", 0), "response": r["response"],
                                     "gold": gold[r["id"]]} for r in recs if gold[r["id"]] is not None], task,
                                   mode=self.cfg.grading)
            write_jsonl_atomic(_scores_path(out_path),
                               [{k: g[k] for k in ("id", "sample", "gold", "pred", "result")} for g in graded])
        distributed.sync(f"pipeline: {label} written")
        return recs

    def _scores(self, out_path: Path) -> dict[tuple[Any, int], bool]:
        """``{(id, sample): result}`` of a gold-free output file (reports only)."""
        p = _scores_path(out_path)
        if not p.exists():
            return {}
        return {(r["id"], int(r.get("sample", 0))): bool(r["result"]) for r in read_jsonl(p, allow_empty=True)}

    # --------------------------------------------------------------- stages

    def stage_data(self, d: Path) -> dict:
        from w2s_jax.method.tasks import load_splits

        splits = load_splits(self.cfg.data)
        missing = [r["id"] for r in splits["test"] if r.get("answer") in (None, "", [])]
        if missing:
            raise UserError(f"config key `data.test`: {len(missing)} test records have no answer (e.g. id "
                            f"{missing[0]!r}); the test set needs gold (OlympicArena: its `val` split)")
        out = {}
        for name, recs in splits.items():
            if not recs and not (name == "train_1" and self.cfg.weak.trained):
                raise UserError(f"data split `{name}` is empty; check the config's data section")
            if self.main:
                write_jsonl_atomic(d / f"{name}.jsonl", recs)
            out[name] = len(recs)
        return {"counts": out}

    def _build_from_preset(self, spec: ModelSpec, out_dir: Path) -> None:
        import jax

        from w2s_jax.io.native import save_model
        from w2s_jax.io.tokenizer import ByteTokenizer, load_tokenizer
        from w2s_jax.models.config import get_preset
        from w2s_jax.models.params import init_params

        tok = ByteTokenizer() if spec.tokenizer in (None, "byte") else load_tokenizer(spec.tokenizer)
        mcfg = get_preset(spec.preset, **spec.overrides)
        if tok.vocab_size > mcfg.vocab_size:
            mcfg = mcfg.replace(vocab_size=tok.vocab_size)
        mcfg = mcfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        params = init_params(mcfg, jax.random.key(spec.seed), self.mesh, self.cfg.mesh.rules_table())
        save_model(out_dir, params, mcfg, tok)  # every process takes part; process 0 writes
        distributed.sync("pipeline: preset model written")

    def _base_model(self, role: str, d: Path) -> Path:
        """The directory of a role's starting model (built from a preset or the given path)."""
        spec: ModelSpec = getattr(self.cfg, role)
        if spec.path is not None:
            return Path(spec.path)
        init = d / "init"
        if not distributed.all_true((init / "w2s_model.json").exists()):
            self._build_from_preset(spec, init)
        return init

    def stage_weak_model(self, d: Path) -> dict:
        spec = self.cfg.weak
        if spec.trained:
            self.log(f"[w2s] weak model: using the fine-tuned checkpoint {spec.path}")
            return {"model": spec.path, "trained_here": False}
        from w2s_jax.method.tasks import get_task

        base = self._base_model("weak", d)
        task = get_task(self.cfg.data.task)
        recs = [_sft_record(r, task.gold_completion(r)) for r in self._data("train_1")]
        info = self._sft(base, recs, self.cfg.weak_train, d / "sft", "weak SFT on train_1 gold")
        return {"model": str(d / "sft" / "model"), "trained_here": True, **info}

    def stage_strong_model(self, d: Path) -> dict:
        spec = self.cfg.strong
        base = self._base_model("strong", d)
        pre = spec.pretrain
        if pre.examples <= 0 and spec.path is not None and base.suffix == ".gguf":
            # dequantise once: every later stage loads the native copy (seconds) instead of the GGUF
            from w2s_jax.io.native import save_model

            m = self.load_model(spec)
            save_model(d / "model", m.params, m.cfg, m.tokenizer)
            distributed.sync("pipeline: strong model converted")
            return {"model": str(d / "model"), "source": str(base)}
        if pre.examples <= 0:
            return {"model": str(base)}
        from w2s_jax.method.synth import make_arith, make_synthetic
        from w2s_jax.method.tasks import get_task, to_records

        seen = {r["question"] for s in ("train_1", "train_2", "test") for r in self._data(s)}
        s = pre.synthetic
        want = pre.examples + len(seen)  # generate extra, then drop anything in the task's splits
        raw = (make_arith(want, pre.seed, s.min_steps, s.max_steps, s.max_value, tuple(s.ops), id_prefix="pretrain")
               if s.kind == "arith" else make_synthetic(s.kind, want, pre.seed))
        pool = [r for r in to_records(self.cfg.data.task, raw, "pretrain") if r["question"] not in seen]
        pool = pool[: pre.examples]
        task = get_task(self.cfg.data.task)
        recs = [_sft_record(r, task.gold_completion(r)) for r in pool]
        if pre.few_shot_max > 0:
            import random

            from w2s_jax.method.prompts import few_shot_prompt

            rng = random.Random(pre.seed)
            zero_shot = [dict(r) for r in recs]
            for i, rec in enumerate(recs):
                others = [zero_shot[j] for j in rng.sample(range(len(recs)), min(len(recs), pre.few_shot_max + 1))
                          if j != i][: rng.randint(0, pre.few_shot_max)]
                rec["prompt"] = few_shot_prompt(pool[i]["question"], others)
        info = self._sft(base, recs, pre.train, d / "pretrain", "strong 'pretraining' on a disjoint pool")
        return {"model": str(d / "pretrain" / "model"), "pretrain_examples": len(recs), **info}

    def _strong_base(self) -> Path:
        return Path(self.manifest("strong_model")["model"])

    def _weak_dir(self) -> Path:
        return Path(self.manifest("weak_model")["model"])

    def stage_weak_labels(self, d: Path) -> dict:
        recs = self._generate(self._weak_dir(), self._data("train_2"), d / "train_2.jsonl", "weak labels (train_2)",
                              gold_free=True)
        return {"counts": _label_stats(recs, self._scores(d / "train_2.jsonl"))}

    def _demos(self) -> tuple[list[dict], bool]:
        """The ICL demonstrations and whether choosing them read train_2 gold."""
        from w2s_jax.method.prompts import choose_demonstrations, load_demo_file, zero_shot_prompt
        from w2s_jax.method.tasks import get_task

        s1 = self.cfg.stage1
        task = get_task(self.cfg.data.task)
        if s1.demos.startswith("file:"):
            return load_demo_file(Path(s1.demos[5:]).expanduser()), False
        if s1.demos == "train_1_gold":
            pool = [{"id": r["id"], "prompt": zero_shot_prompt(r["question"]), "response": task.gold_completion(r)}
                    for r in self._data("train_1")]
            return choose_demonstrations(pool, k=s1.n_demos, seed=s1.demo_seed, answer_key=task.answer_key), False
        weak = read_jsonl(self.path("weak_labels", "train_2.jsonl"))
        if s1.demos == "correct":  # the ablation: gold of train_2 decides which outputs may be shown
            scores = self._scores(self.path("weak_labels", "train_2.jsonl"))
            weak = [{**r, "result": scores.get((r["id"], 0), False)} for r in weak]
            n_ok = sum(r["result"] for r in weak)
            if n_ok < s1.n_demos:
                raise UserError(f"stage strong_icl: only {n_ok} of {len(weak)} weak outputs on train_2 are correct, "
                                f"{s1.n_demos} are needed as demonstrations (stage1.demos=correct)")
            return choose_demonstrations(weak, k=s1.n_demos, seed=s1.demo_seed, use_gold=True), True
        n_key = sum(task.answer_key in r["response"] for r in weak)
        if n_key < s1.n_demos:
            raise UserError(f"stage strong_icl: only {n_key} of {len(weak)} weak outputs on train_2 contain the "
                            f"answer key `{task.answer_key}`, {s1.n_demos} are needed as demonstrations; train the "
                            "weak model longer or set stage1.demos=train_1_gold (or file:PATH)")
        return choose_demonstrations(weak, k=s1.n_demos, seed=s1.demo_seed, answer_key=task.answer_key), False

    def stage_strong_icl(self, d: Path) -> dict:
        demos, read_gold = self._demos()
        if self.main:
            write_jsonl_atomic(d / "demos.jsonl", demos)
        recs = self._generate(self._strong_base(), self._data("train_2"), d / "train_2.jsonl",
                              "strong ICL labels (train_2)", demos=demos, gold_free=True)
        return {"counts": _label_stats(recs, self._scores(d / "train_2.jsonl")), "demos": [r["id"] for r in demos],
                "demos_source": self.cfg.stage1.demos, "demos_read_gold": read_gold}

    def _stage1_sft(self, sets: dict, d: Path, rnd: int, variants: list[str], info: dict) -> dict[str, str]:
        """Fine-tune the original strong model on each ``variants`` set; ``{variant: model dir}``. An empty
        set trains nothing: the untrained strong model stands in for it (said loudly)."""
        models = {}
        for v in variants:
            recs = sets[v]
            out = d / f"round{rnd}_{v}"
            if not recs:
                msg = (f"round {rnd}: the consistency filter kept no questions (the two label sets never agree); "
                       f"the {v}-ft model is the untrained strong model")
                self.log(f"[w2s] WARNING stage stage1: {msg}")
                info.setdefault("skipped", msg)
                models[v] = str(self._strong_base())
                continue
            info[f"round{rnd}"][f"{v}_ft"] = self._sft(self._strong_base(), recs,
                                                       self.cfg.stage1.train or self.cfg.strong_train, out,
                                                       f"Stage I round {rnd}: {v}-ft")
            models[v] = str(out / "model")
        return models

    def stage_stage1(self, d: Path) -> dict:
        from w2s_jax.method.datasets import consistency_sets, pad_sets

        s1 = self.cfg.stage1
        weak_path, icl_path = self.path("weak_labels", "train_2.jsonl"), self.path("strong_icl", "train_2.jsonl")
        weak, icl = read_jsonl(weak_path), read_jsonl(icl_path)
        from w2s_jax.method.grading import equivalence

        eq = equivalence(self.cfg.data.task)
        sets, stats = consistency_sets(weak, icl, equiv=eq)
        if s1.pad_to:
            sets, stats["padded_questions"] = pad_sets(sets, weak, icl, s1.pad_to)
        if self.main:
            write_json_atomic(d / "round1_stats.json", stats)
            for v in ("weak", "icl", "hybrid"):
                write_jsonl_atomic(d / f"round1_{v}.jsonl", sets[v])
        info: dict[str, Any] = {"round1": {**stats, **_kept_scores(sets, self._scores(weak_path))}}
        # the set the final model trains on goes last, so a shared log ends with it
        variants = [v for v in s1.variants if v != s1.train_set] + [s1.train_set]
        r1 = self._stage1_sft(sets, d, 1, variants, info)
        models = {f"stage1_round1_{v}": r1[v] for v in s1.variants}
        final = r1[s1.train_set]
        if s1.rounds == 2:
            # iteration 2: the round-1 weak-ft and icl-ft strong models label train_2 zero-shot; the
            # questions where they agree give the new sets; the ORIGINAL strong model is fine-tuned again
            train2 = self._data("train_2")
            wl, il = d / "round2_weak_ft_labels.jsonl", d / "round2_icl_ft_labels.jsonl"
            weak2 = self._generate(Path(r1["weak"]), train2, wl, "round 2 labels (round-1 weak-ft)", gold_free=True)
            icl2 = self._generate(Path(r1["icl"]), train2, il, "round 2 labels (round-1 icl-ft)", gold_free=True)
            sets2, stats2 = consistency_sets(weak2, icl2, equiv=eq)
            if self.main:
                write_json_atomic(d / "round2_stats.json", stats2)
                for v in ("weak", "icl", "hybrid"):
                    write_jsonl_atomic(d / f"round2_{v}.jsonl", sets2[v])
            info["round2"] = {**stats2, **_kept_scores(sets2, self._scores(wl))}
            r2 = self._stage1_sft(sets2, d, 2, [s1.train_set], info)
            models[f"stage1_round2_{s1.train_set}"] = final = r2[s1.train_set]
        info["models"] = models
        info["final"] = final
        return info

    def stage_full_weak(self, d: Path) -> dict:
        if not self.cfg.baselines.full_weak:
            return {"skipped": True}
        from w2s_jax.method.datasets import full_weak_sft

        recs = full_weak_sft(read_jsonl(self.path("weak_labels", "train_2.jsonl")))
        return {"model": str(d / "sft" / "model"),
                **self._sft(self._strong_base(), recs, self.cfg.strong_train, d / "sft", "full weak FT baseline")}

    def stage_gold(self, d: Path) -> dict:
        if not self.cfg.baselines.gold:
            return {"skipped": True}
        from w2s_jax.method.tasks import get_task

        task = get_task(self.cfg.data.task)
        recs = [{"id": r["id"], "prompt": task.prompt(r), "completion": task.gold_completion(r)}
                for r in self._data("train_2")]
        return {"model": str(d / "sft" / "model"),
                **self._sft(self._strong_base(), recs, self.cfg.strong_train, d / "sft", "gold SFT ceiling")}

    def stage_sampling(self, d: Path) -> dict:
        from w2s_jax.method.datasets import contrastive_pairs, vote

        s2 = self.cfg.stage2
        model = Path(self.manifest("stage1")["final"])
        samples = self._generate(model, self._data("train_2"), d / "samples.jsonl", "Stage I model sampling",
                                 n=s2.n_samples, temperature=s2.temperature, top_p=s2.top_p, seed=s2.seed,
                                 max_new_tokens=s2.max_new_tokens, gold_free=True)
        per_sample: list[list[dict]] = [[] for _ in range(s2.n_samples)]
        for r in samples:
            per_sample[r["sample"]].append(r)
        from w2s_jax.method.grading import equivalence

        eq = equivalence(self.cfg.data.task)
        votes = vote(per_sample, equiv=eq)
        weak = read_jsonl(self.path("weak_labels", "train_2.jsonl"))
        pairs, counts = contrastive_pairs(self.cfg.data.task, weak, votes, seed=s2.pair_seed, equiv=eq)
        if self.main:
            write_jsonl_atomic(d / "votes.jsonl", votes)
            write_jsonl_atomic(d / "pairs.jsonl", pairs)
            write_json_atomic(d / "pairs.stats.json", counts)
        scores = self._scores(d / "samples.jsonl")
        gold_counts = _pair_scores(pairs, votes, self._scores(self.path("weak_labels", "train_2.jsonl")), scores)
        return {"samples": len(samples), "pairs": len(pairs), "pair_counts": {**counts, **gold_counts},
                "pass_at_k": _pass_at_k([{"id": k[0], "result": v} for k, v in scores.items()], self.cfg.pass_k)}

    def stage_stage2(self, d: Path) -> dict:
        from w2s_jax.train.loop import run_dpo

        pairs = read_jsonl(self.path("sampling", "pairs.jsonl"), allow_empty=True)
        if not pairs:
            msg = "no contrastive pairs (see sampling/pairs.stats.json); Stage II is the Stage I model"
            self.log(f"[w2s] WARNING stage stage2: {msg}")
            return {"model": self.manifest("stage1")["final"], "pairs": 0, "skipped": msg}
        model = self.load_model(Path(self.manifest("stage1")["final"]))
        self.log(f"[w2s] Stage II {self.cfg.stage2.train.loss_type}: {len(pairs)} pairs")
        res = run_dpo(model, pairs, self.cfg.stage2.train, d / "train", mesh=self.mesh,
                      rules=self.cfg.mesh.rules_table(), ref_cache=d / "reference_logps.jsonl")
        return {"model": str(d / "train" / "model"), "pairs": len(pairs), **_summary(res)}

    _eval_cpu0: float | None = None

    def stage_eval(self, d: Path) -> dict:
        self._eval_cpu0 = time.process_time()
        test = self._data("test")
        b = self.cfg.baselines
        entries: list[tuple[str, Path, list[dict] | None, bool]] = [("weak", self._weak_dir(), None, False)]
        if b.strong_zero_shot:
            entries.append(("strong (zero-shot)", self._strong_base(), None, False))
        if b.strong_icl:
            entries.append(("strong (ICL)", self._strong_base(), read_jsonl(self.path("strong_icl", "demos.jsonl")),
                            False))
        if b.full_weak:
            entries.append(("full weak FT", Path(self.manifest("full_weak")["model"]), None, False))
        s1, s2 = self.manifest("stage1"), self.manifest("stage2")
        for key, path in s1["models"].items():
            rnd, variant = key.split("_")[1][-1], key.split("_")[2]
            label = f"Stage I round {rnd} ({variant}-ft)"
            entries.append((label, Path(path), None, True))
        label = f"Stage II ({self.cfg.stage2.train.loss_type})" + (" (skipped)" if "skipped" in s2 else "")
        entries.append((label, Path(s2["model"]), None, True))
        if b.gold:
            entries.append(("gold SFT (ceiling)", Path(self.manifest("gold")["model"]), None, False))
        rows = []
        s2c = self.cfg.stage2
        for label, model_dir, demos, sampled in entries:
            slug = _slug(label)
            recs = self._generate(model_dir, test, d / f"{slug}.jsonl", f"eval {label}", demos=demos)
            acc = sum(bool(r.get("result")) for r in recs) / len(recs)
            row = {"model": label, "accuracy": acc, "n": len(recs), "outputs": f"eval/{slug}.jsonl"}
            if sampled and self.cfg.eval_samples > 0:
                samples = self._generate(model_dir, test, d / f"{slug}.samples.jsonl", f"eval {label} (sampled)",
                                         n=self.cfg.eval_samples, temperature=s2c.temperature, top_p=s2c.top_p,
                                         seed=s2c.seed, max_new_tokens=s2c.max_new_tokens)
                row["pass_at_k"] = _pass_at_k(samples, self.cfg.pass_k)
            rows.append(row)
        results = build_results(self, rows)
        if self.main:
            write_json_atomic(self.path("results.json"), results)
            from w2s_jax.core.jsonl import write_text_atomic

            write_text_atomic(self.path("results.md"), results_markdown(results))
            try:
                plot_results(results, self.path("results.png"))
            except Exception as e:  # the chart is a convenience; never lose the results for it
                self.log(f"[w2s] warning: could not draw results.png ({e})")
        self.log(results_markdown(results))
        return {"accuracy": {r["model"]: r["accuracy"] for r in rows}}


# ----------------------------------------------------------------------------- reports


def _print_main(msg: str) -> None:
    """The default progress log: printed by process 0 only."""
    if distributed.is_main_process():
        print(msg, flush=True)


def _has(d: dict, dotted: str) -> bool:
    try:
        _get(d, dotted)
        return True
    except (KeyError, TypeError):
        return False


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


def _sft_record(rec: dict, completion: str) -> dict:
    from w2s_jax.method.prompts import zero_shot_prompt

    return {"id": rec["id"], "prompt": zero_shot_prompt(rec["question"]), "completion": completion}


def _summary(res: Any) -> dict:
    if res is None:
        return {}
    if dataclasses.is_dataclass(res):
        res = dataclasses.asdict(res)
    return {k: v for k, v in dict(res).items() if isinstance(v, (int, float, str, bool)) or v is None}


def _scores_path(out_path: Path) -> Path:
    """Where the gold scores of a gold-free output file go (read by the reports only)."""
    return out_path.with_name(out_path.name.removesuffix(".jsonl") + ".gold_scores.jsonl")


def _label_stats(recs: list[dict], scores: dict) -> dict:
    vals = [scores[(r["id"], int(r.get("sample", 0)))] for r in recs if (r["id"], int(r.get("sample", 0))) in scores]
    return {"total": len(recs), "with_answer": sum(bool(r.get("pred")) for r in recs),
            "accuracy_vs_gold": (sum(vals) / len(vals)) if vals else None}


def _kept_scores(sets: dict, scores: dict) -> dict:
    """Scoring only: how many kept labels (the first label set's answers) are right against gold."""
    vals = [scores[(r["id"], 0)] for r in sets["weak"] if (r["id"], 0) in scores]
    if not vals:
        return {"label_accuracy": None}
    return {"kept_correct": sum(vals), "label_accuracy": sum(vals) / len(vals)}


def _pair_scores(pairs: list[dict], votes: list[dict], weak_scores: dict, sample_scores: dict) -> dict:
    """Scoring only: how many pairs' chosen completions are right against gold."""
    by_resp: dict[tuple[Any, str], bool] = {}
    for v in votes:
        for e in v["positives"] + v["negatives"]:
            if (v["id"], e["sample"]) in sample_scores:
                by_resp[(v["id"], e["response"])] = sample_scores[(v["id"], e["sample"])]
    vals = []
    for p in pairs:
        if p["branch"] == "weak_chosen" and (p["id"], 0) in weak_scores:
            vals.append(weak_scores[(p["id"], 0)])
        elif p["branch"] == "weak_rejected" and (p["id"], p["chosen"]) in by_resp:
            vals.append(by_resp[(p["id"], p["chosen"])])
    return {"chosen_with_result": len(vals), "chosen_correct": sum(vals)} if vals else {}


def _pass_at_k(samples: list[dict], ks: list[int]) -> dict:
    from w2s_jax.method.grading import pass_at_k

    by_id: dict[Any, list[bool]] = {}
    for r in samples:
        if "result" in r:
            by_id.setdefault(r["id"], []).append(bool(r["result"]))
    if not by_id:
        return {}
    out = {}
    for k in ks:
        vals = [pass_at_k(len(v), sum(v), k) for v in by_id.values() if len(v) >= k]
        if vals:
            out[f"pass@{k}"] = sum(vals) / len(vals)
    return out


def _model_info(p: Pipeline, role: str) -> dict:
    """What a role's starting model is: where it came from, its shape and parameter count."""
    spec: ModelSpec = getattr(p.cfg, role)
    man = p.manifest(f"{role}_model") or {}
    info: dict[str, Any] = {"source": spec.path or f"preset {spec.preset} (random init, seed {spec.seed})"}
    if role == "weak":
        info["trained_here"] = man.get("trained_here", spec.path is None or not spec.trained)
    model_dir = Path(man["model"]) if man.get("model") else None
    if role == "weak" and spec.path is None and (p.path("weak_model", "init") / "w2s_model.json").is_file():
        model_dir = p.path("weak_model", "init")
    meta_file = model_dir / "w2s_model.json" if model_dir is not None else None
    if meta_file is not None and meta_file.is_file():
        from w2s_jax.models.config import ModelConfig

        meta = json.loads(meta_file.read_text())
        m = meta.get("model", {})
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        try:
            mc = ModelConfig(**{k: v for k, v in m.items() if k in names})
            info.update(name=mc.name, params=mc.num_params, d_model=mc.d_model, n_layers=mc.n_layers,
                        vocab_size=mc.vocab_size)
        except (TypeError, ValueError):
            pass
        tok = meta.get("tokenizer") or {}
        info["tokenizer"] = "byte-level" if tok.get("type") == "byte" else "the model's own (BPE)"
    return info


def _machine() -> dict:
    import os
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "backend": jax.default_backend(),
            "devices": f"{len(dev)} x {dev[0].device_kind}" if dev else "none", "jax": jax.__version__,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}


def _train_summary(t: TrainConfig) -> str:
    length = f"{t.max_steps} steps" if t.max_steps is not None else f"{t.epochs} epoch{'s' if t.epochs != 1 else ''}"
    lora = f", LoRA r={t.lora.rank}" if t.lora is not None else ", full fine-tuning"
    return f"{length}, batch {t.batch_size} x {t.seq_len} tokens, lr {t.lr:g}{lora}"


def build_results(p: Pipeline, rows: list[dict]) -> dict:
    acc = {r["model"]: r["accuracy"] for r in rows}
    weak = acc.get("weak")
    ceiling = acc.get("gold SFT (ceiling)")
    for r in rows:
        if weak is not None and ceiling is not None and ceiling != weak and r["model"] not in ("weak",):
            r["pgr"] = (r["accuracy"] - weak) / (ceiling - weak)
        else:
            r["pgr"] = None
    stage1 = p.manifest("stage1") or {}
    sampling = p.manifest("sampling") or {}
    data = p.manifest("data") or {}
    cfg = p.cfg
    manifests = {s: p.manifest(s) or {} for s in STAGE_NAMES}
    started = [m["started"] for m in manifests.values() if m.get("started")]
    wall = (time.time() - min(started)) if started else None
    cpu = {s: m.get("cpu_seconds") for s, m in manifests.items()}
    if manifests["eval"].get("status") == "running" and p._eval_cpu0 is not None:
        cpu["eval"] = round(time.process_time() - p._eval_cpu0, 2)
    syn = cfg.data.synthetic
    source = cfg.data.source + (f" ({syn.kind}, {syn.min_steps}-{syn.max_steps} steps, numbers up to {syn.max_value})"
                                if cfg.data.source == "synthetic" else "")
    return {
        "name": cfg.name,
        "task": cfg.data.task,
        "config_hash": config_hash(cfg),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "models": rows,
        "model_info": {"weak": _model_info(p, "weak"), "strong": _model_info(p, "strong")},
        "training": {"weak": _train_summary(cfg.weak_train), "strong": _train_summary(cfg.strong_train),
                     "stage1": _train_summary(cfg.stage1.train or cfg.strong_train),
                     "stage2": f"{cfg.stage2.train.loss_type}, " + _train_summary(cfg.stage2.train)},
        "seeds": {"data.seed": cfg.data.seed, "weak.seed": cfg.weak.seed, "strong.seed": cfg.strong.seed,
                  "weak_train.seed": cfg.weak_train.seed, "strong_train.seed": cfg.strong_train.seed,
                  "stage1.demo_seed": cfg.stage1.demo_seed, "stage2.seed": cfg.stage2.seed,
                  "stage2.pair_seed": cfg.stage2.pair_seed, "stage2.train.seed": cfg.stage2.train.seed},
        "data": data.get("counts", {}),
        "data_source": source,
        "weak_labels": (p.manifest("weak_labels") or {}).get("counts"),
        "strong_icl_labels": (p.manifest("strong_icl") or {}).get("counts"),
        "n_demos": cfg.stage1.n_demos,
        "stage1": {k: v for k, v in stage1.items() if k.startswith("round")},
        "stage1_train_set": cfg.stage1.train_set,
        "n_samples": cfg.stage2.n_samples,
        "pairs": sampling.get("pair_counts"),
        "pass_at_k": sampling.get("pass_at_k"),
        **_gold_use(p),
        # the stage writing this report (eval) is still running: its time so far
        "seconds": {s: manifests[s].get("seconds") if manifests[s].get("status") != "running" or not
                    manifests[s].get("started") else round(time.time() - manifests[s]["started"], 2)
                    for s in STAGE_NAMES},
        "cpu_seconds": cpu,
        "wall_seconds": None if wall is None else round(wall, 1),
    }


def _gold_use(p: Pipeline) -> dict:
    """Which demonstrations were used and which stages read train_2 gold (beyond scoring)."""
    icl = p.manifest("strong_icl") or {}
    reads = []
    if icl.get("demos_read_gold"):
        reads.append("strong_icl: demonstrations chosen among gold-correct weak outputs (stage1.demos=correct)")
    if p.cfg.baselines.gold:
        reads.append("gold: the ceiling baseline is trained on train_2 gold solutions")
    return {"demonstrations": {"source": icl.get("demos_source"), "ids": icl.get("demos"),
                               "read_gold": bool(icl.get("demos_read_gold"))},
            "train_2_gold_read_by": reads}


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{100 * x:.2f}" if pct else f"{x:.3f}"
    return str(x)


def _model_line(info: dict) -> str:
    parts = [str(info.get("source", "-"))]
    if info.get("params"):
        parts.append(f"{info['params'] / 1e6:.2f}M parameters" if info["params"] >= 1e6
                     else f"{info['params'] / 1e3:.0f}K parameters")
    if info.get("d_model"):
        parts.append(f"d={info['d_model']} x {info['n_layers']} layers")
    if info.get("tokenizer"):
        parts.append(f"{info['tokenizer']} tokenizer")
    return "; ".join(parts)


def results_markdown(res: dict) -> str:
    lines = [f"# Results: {res['name']} ({res['task']})", ""]
    mach = res.get("machine") or {}
    if res.get("date") or mach:
        lines += [f"Run finished {res.get('date', '-')} on {mach.get('cpu', '-')} ({mach.get('cpu_cores', '-')} "
                  f"logical cores; JAX {mach.get('jax', '-')} on {mach.get('devices', '-')}).", ""]
    n_test = res["models"][0]["n"] if res["models"] else 0
    lines += [f"## Accuracy on test ({n_test} questions, greedy)", "",
              "| model | accuracy (%) | PGR | n |", "| --- | ---: | ---: | ---: |"]
    for r in res["models"]:
        lines.append(f"| {r['model']} | {_fmt(r['accuracy'])} | {_fmt(r.get('pgr'), pct=False)} | {r['n']} |")
    lines += ["", "PGR = (acc - acc(weak)) / (acc(gold SFT ceiling) - acc(weak)).", ""]
    info = res.get("model_info") or {}
    if info:
        tr = res.get("training") or {}
        lines += ["## What ran", "", "| item | value |", "| --- | --- |"]
        lines.append(f"| weak model | {_model_line(info.get('weak', {}))} |")
        lines.append(f"| weak training (train_1 gold) | {tr.get('weak', '-')} |")
        lines.append(f"| strong model | {_model_line(info.get('strong', {}))} |")
        lines.append(f"| strong SFT: full weak FT, gold | {tr.get('strong', '-')} |")
        lines.append(f"| strong SFT: Stage I | {tr.get('stage1', tr.get('strong', '-'))} |")
        lines.append(f"| Stage II | {tr.get('stage2', '-')} |")
        lines.append(f"| strong ICL | {res.get('n_demos', '-')} demonstrations |")
        lines.append(f"| Stage I training set | {res.get('stage1_train_set', '-')} |")
        lines.append(f"| samples per train_2 question | {res.get('n_samples', '-')} |")
        lines.append(f"| data | {res.get('data_source', '-')} |")
        seeds = res.get("seeds") or {}
        if seeds:
            lines.append("| seeds | " + ", ".join(f"{k}={v}" for k, v in seeds.items()) + " |")
        lines.append(f"| config hash | {res.get('config_hash', '-')} |")
        lines.append("")
    lines += ["## Data", "", "| item | count |", "| --- | ---: |"]
    for k, v in (res.get("data") or {}).items():
        lines.append(f"| {k} | {v} |")
    for key, title in (("weak_labels", "weak labels on train_2"), ("strong_icl_labels", "strong ICL labels")):
        c = res.get(key) or {}
        if c:
            lines.append(f"| {title}: answered / total | {c.get('with_answer')} / {c.get('total')} |")
            lines.append(f"| {title}: accuracy vs gold (%) | {_fmt(c.get('accuracy_vs_gold'))} |")
    for rnd, st in (res.get("stage1") or {}).items():
        lines.append(f"| Stage I {rnd}: kept / total | {st.get('kept')} / {st.get('total')} |")
        lines.append(f"| Stage I {rnd}: kept label accuracy vs gold (%) | {_fmt(st.get('label_accuracy'))} |")
    for k, v in (res.get("pairs") or {}).items():
        lines.append(f"| pairs: {k} | {v} |")
    for k, v in (res.get("pass_at_k") or {}).items():
        lines.append(f"| Stage I sampling {k} on train_2 (%) | {_fmt(v)} |")
    for r in res["models"]:
        for k, v in (r.get("pass_at_k") or {}).items():
            lines.append(f"| {r['model']}: test {k} (%) | {_fmt(v)} |")
    demos = res.get("demonstrations") or {}
    if demos.get("ids") is not None:
        lines += ["", f"ICL demonstrations ({demos.get('source')}): ids {', '.join(str(i) for i in demos['ids'])}."]
    reads = res.get("train_2_gold_read_by") or []
    lines += ["", "train_2 gold read (besides scoring): " + ("; ".join(reads) if reads else "by no stage") + "."]
    secs = {k: v for k, v in (res.get("seconds") or {}).items() if v is not None}
    cpu = res.get("cpu_seconds") or {}
    if secs:
        lines += ["", "## Time per stage", "", "CPU = this process's CPU time, all threads (on a busy machine the "
                  "wall time is longer than the stage's cost).", "",
                  "| stage | wall (s) | CPU (s) |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v:.0f} | " + (f"{cpu[k]:.0f}" if cpu.get(k) is not None else "-") + " |"
                  for k, v in secs.items()]
        cpus = [cpu[k] for k in secs if cpu.get(k) is not None]
        lines.append(f"| sum of stages | {sum(secs.values()):.0f} | {round(sum(cpus)) if cpus else '-'} |")
        if res.get("wall_seconds") is not None:
            lines.append(f"| wall, first stage start to report (includes earlier runs when resumed) | "
                         f"{res['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _spread_labels(ys: list[float], gap: float) -> list[float]:
    """Label heights near ``ys`` with at least ``gap`` between neighbours (order kept)."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = list(ys)
    for a, b in zip(order, order[1:]):
        if out[b] - out[a] < gap:
            out[b] = out[a] + gap
    return out


def plot_results(res: dict, path: Path) -> None:
    """Accuracy per model (bars, accuracy and PGR above each), the weak model and the gold ceiling as lines."""
    import matplotlib.pyplot as plt

    fig = results_figure(res)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def results_figure(res: dict):
    """The figure of :func:`plot_results` (a matplotlib Figure, not yet saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["models"]
    names = [r["model"] for r in rows]
    vals = [100 * r["accuracy"] for r in rows]
    acc = dict(zip(names, vals))
    weak, gold = acc.get("weak"), acc.get("gold SFT (ceiling)")
    colors = ["#999999" if n == "weak" else "#228833" if n.startswith("gold") else
              "#cc6677" if n.startswith("full weak") else "#4477aa" for n in names]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.25 * len(names) + 2.0), 4.8))
    x = list(range(len(names)))
    ax.bar(x, vals, color=colors, width=0.65)
    top = max([*vals, 1.0])
    ymax = min(100.0, top) * 1.22 + 4
    for xi, v, r in zip(x, vals, rows):
        label = f"{v:.1f}%"
        if r.get("pgr") is not None and r["model"] not in ("weak", "gold SFT (ceiling)"):
            label += f"\nPGR {r['pgr']:.2f}"
        ax.text(xi, v + ymax * 0.015, label, ha="center", va="bottom", fontsize=8, zorder=3,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0, "alpha": 0.85})
    refs = [(v, f"{lbl} {v:.1f}%", c) for v, lbl, c in ((weak, "weak", "#777777"), (gold, "gold ceiling", "#228833"))
            if v is not None]
    label_ys = _spread_labels([v for v, _, _ in refs], ymax * 0.06)
    for (v, lbl, c), ly in zip(refs, label_ys):
        ax.axhline(v, color=c, linestyle="--", linewidth=1)
        ax.annotate(lbl, xy=(1.0, v), xycoords=("axes fraction", "data"), xytext=(1.01, ly),
                    textcoords=("axes fraction", "data"), va="center", ha="left", fontsize=8, color=c)
    ax.set_ylim(0, ymax)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 100])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    n_test = rows[0]["n"] if rows else 0
    strong = ((res.get("model_info") or {}).get("strong") or {}).get("name") or ""
    sub = f"{n_test} test questions" + (f"; strong: {strong}" if strong else "")
    ax.set_title(f"{res['name']} ({res['task']}): {sub}", fontsize=10, pad=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.subplots_adjust(right=0.84)
    return fig


# ----------------------------------------------------------------------------- CLI


def run_pipeline(config: str | RunConfig | None = None, overrides: list[str] = (), out: str | Path | None = None,
                 from_stage: str | None = None, until: str | None = None) -> dict | None:
    """Python API: run (or resume) the pipeline; returns results.json's content when eval ran."""
    cfg = config if isinstance(config, RunConfig) else load_run_config(config, overrides)
    if isinstance(config, RunConfig):
        validate(cfg)
    out = Path(out) if out is not None else Path("runs") / cfg.name
    return Pipeline(cfg, out).run(from_stage=from_stage, until=until)


def main(argv: list[str], prog: str = "w2s run", command: str = "run") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
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
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    res = Pipeline(cfg, out).run(from_stage=args.from_stage, until=args.until)
    if res is not None and distributed.is_main_process():
        print(f"\n[w2s] results: {out / 'results.md'}", file=sys.stderr)
    return 0


__all__ = ["RunConfig", "ModelSpec", "Pipeline", "run_pipeline", "load_run_config", "STAGE_NAMES", "from_dict"]
