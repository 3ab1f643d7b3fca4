"""The run directory of ``w2s run`` and what its stages share.

Each stage writes its artifacts plus ``stages/<name>.json`` (fingerprint, inputs, counts, timings). A
finished stage with the same fingerprint is skipped; an interrupted one continues (training resumes
from its last checkpoint, generation skips ids already written). Multi-host: process 0 writes the
data, manifests, JSONL outputs and reports; the other processes wait at a barrier
(``distributed.sync``) wherever they read what it wrote.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from w2s_jax.core.config import config_hash, dump_yaml, to_dict
from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import read_jsonl, write_json_atomic, write_jsonl_atomic
from w2s_jax.io.native import load_model, save_model
from w2s_jax.method.grading import extract_pred, gold_answer, grade_records
from w2s_jax.method.prompts import zero_shot_prompt
from w2s_jax.method.tasks import get_task
from w2s_jax.parallel import distributed
from w2s_jax.parallel.locking import LOCK_NAME, hold
from w2s_jax.pipeline.config import RunConfig
from w2s_jax.pipeline.fingerprints import STAGE_NAMES, STAGES, Stage, get_key, has_key, stage_fingerprints
from w2s_jax.pipeline.generation import generate_records
from w2s_jax.pipeline.model_spec import ModelSpec, load_model_spec, preset_model, resolve_model_spec
from w2s_jax.train.loop import TrainConfig, run_sft

__all__ = ["StageRunner", "sft_record", "summary", "scores_path"]


class StageRunner:
    """Runs the stages of one config in one run directory: bookkeeping (manifests, fingerprints, the lock)
    and what the stages share (loading, fine-tuning and generating with models). The stages themselves are
    the ``stage_*`` methods of :class:`w2s_jax.pipeline.stages.Pipeline`."""

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
        try:
            old = yaml.safe_load(prev.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{prev}: corrupt ({str(e).splitlines()[0]}); fix or delete it, or choose another --out") \
                from None
        if not isinstance(old, dict):
            raise UserError(f"{prev}: corrupt (not a mapping of keys); fix or delete it, or choose another --out")
        for key in ("name", "data.task"):
            a = get_key(old, key) if has_key(old, key) else None
            b = get_key(to_dict(self.cfg), key)
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
        with hold(self.out / LOCK_NAME, f"run directory {self.out}"):
            return self._run_locked(from_stage, until)

    def _run_locked(self, from_stage: str | None = None, until: str | None = None) -> dict | None:
        for s in (from_stage, until):
            if s is not None and s not in STAGE_NAMES:
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
        for role in ("weak", "strong"):
            setattr(self.cfg, role, resolve_model_spec(getattr(self.cfg, role), role, self.log))

    # --------------------------------------------------------------- helpers

    def _data(self, split: str) -> list[dict]:
        return read_jsonl(self.path("data", f"{split}.jsonl"))

    def _model_dir(self, name: str) -> Path:
        return self.path("models", name)

    def load_model(self, name_or_spec):
        """A model directory's model; a user-given checkpoint (a role's ``path``) is loaded by its spec."""
        for role in ("weak", "strong"):  # a user-given checkpoint: honour its spec
            spec = getattr(self.cfg, role)
            if name_or_spec is spec or (spec.path is not None and str(name_or_spec) == spec.path):
                return load_model_spec(spec, self.mesh, self.cfg.mesh.rules_table(), role)
        if isinstance(name_or_spec, ModelSpec):
            return load_model_spec(name_or_spec, self.mesh, self.cfg.mesh.rules_table())
        return load_model(str(name_or_spec), mesh=self.mesh, rules=self.cfg.mesh.rules_table())

    def _sft(self, base_dir: Path, records: list[dict], tcfg: TrainConfig, out_dir: Path, label: str) -> dict:
        model = self.load_model(base_dir)
        self.log(f"[w2s] {label}: SFT on {len(records)} examples")
        res = run_sft(model, records, tcfg, out_dir, mesh=self.mesh, rules=self.cfg.mesh.rules_table())
        return {"examples": len(records), **summary(res)}

    def _generate(self, model_dir: Path, records: list[dict], out_path: Path, label: str, *,
                  demos: list[dict] | None = None, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, max_new_tokens: int | None = None, gold_free: bool = False) -> list[dict]:
        """Answers for ``records`` (canonical task records); resumable.

        ``gold_free=False`` (test set): each output record is graded against gold (``pred``, ``gold``,
        ``result``). ``gold_free=True`` (train_2): the model never sees gold and the output records carry
        only the extracted ``pred``; the scores against gold go to a separate ``*.gold_scores.jsonl``
        next to ``out_path`` that only the reports read (:meth:`_scores`)."""
        scfg = dataclasses.replace(self.cfg.generation, n=n, temperature=temperature, top_p=top_p, seed=seed)
        if max_new_tokens is not None:
            scfg = dataclasses.replace(scfg, max_new_tokens=max_new_tokens)
        model = self.load_model(model_dir)
        self.log(f"[w2s] {label}: generating {len(records)} x {n}")
        kw = dict(demos=demos, grade_mode=self.cfg.grading, mesh=self.mesh, rules=self.cfg.mesh.rules_table(),
                  desc=label)
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
            write_jsonl_atomic(scores_path(out_path),
                               [{k: g[k] for k in ("id", "sample", "gold", "pred", "result")} for g in graded])
        distributed.sync(f"pipeline: {label} written")
        return recs

    def _scores(self, out_path: Path) -> dict[tuple[Any, int], bool]:
        """``{(id, sample): result}`` of a gold-free output file (reports only)."""
        p = scores_path(out_path)
        if not p.exists():
            return {}
        return {(r["id"], int(r.get("sample", 0))): bool(r["result"]) for r in read_jsonl(p, allow_empty=True)}

    def _build_from_preset(self, role: str, out_dir: Path) -> None:
        model = preset_model(getattr(self.cfg, role), self.mesh, self.cfg.mesh.rules_table(), role)
        save_model(out_dir, model.params, model.cfg, model.tokenizer)  # every process takes part; process 0 writes
        distributed.sync("pipeline: preset model written")

    def _base_model(self, role: str, d: Path) -> Path:
        """The directory of a role's starting model (built from a preset or the given path)."""
        spec = getattr(self.cfg, role)
        if spec.path is not None:
            return Path(spec.path)
        init = d / "init"
        if not distributed.all_true((init / "w2s_model.json").exists()):
            self._build_from_preset(role, init)
        return init

    def _strong_base(self) -> Path:
        return Path(self.manifest("strong_model")["model"])

    def _weak_dir(self) -> Path:
        return Path(self.manifest("weak_model")["model"])


def _print_main(msg: str) -> None:
    """The default progress log: printed by process 0 only."""
    if distributed.is_main_process():
        print(msg, flush=True)


def sft_record(rec: dict, completion: str) -> dict:
    return {"id": rec["id"], "prompt": zero_shot_prompt(rec["question"]), "completion": completion}


def summary(res: Any) -> dict:
    if res is None:
        return {}
    if dataclasses.is_dataclass(res):
        res = dataclasses.asdict(res)
    return {k: v for k, v in dict(res).items() if isinstance(v, (int, float, str, bool)) or v is None}


def scores_path(out_path: Path) -> Path:
    """Where the gold scores of a gold-free output file go (read by the reports only)."""
    return out_path.with_name(out_path.name.removesuffix(".jsonl") + ".gold_scores.jsonl")
