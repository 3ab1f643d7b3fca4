"""The stages of ``w2s run`` (the Python API: ``Pipeline(cfg, out).run()``).

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

What a stage reads and its fingerprint: :mod:`w2s_jax.pipeline.fingerprints`; the run directory,
resuming and what the stages share: :mod:`w2s_jax.pipeline.runner`; the reports:
:mod:`w2s_jax.pipeline.report`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import read_jsonl, write_json_atomic, write_jsonl_atomic, write_text_atomic
from w2s_jax.io.native import save_model
from w2s_jax.method.datasets import consistency_sets, contrastive_pairs, full_weak_sft, pad_sets, vote
from w2s_jax.method.grading import equivalence, pass_at_k
from w2s_jax.method.prompts import choose_demonstrations, few_shot_prompt, load_demo_file, zero_shot_prompt
from w2s_jax.method.splits import load_splits
from w2s_jax.method.synth import make_arith, make_synthetic
from w2s_jax.method.tasks import get_task, to_records
from w2s_jax.parallel import distributed
from w2s_jax.pipeline.report import build_results, plot_results, results_markdown
from w2s_jax.pipeline.runner import StageRunner, sft_record, summary
from w2s_jax.train.loop import run_dpo

__all__ = ["Pipeline"]


class Pipeline(StageRunner):
    """Runs the stages of one config in one run directory (also the Python API: ``Pipeline(cfg, out).run()``)."""

    def stage_data(self, d: Path) -> dict:
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

    def stage_weak_model(self, d: Path) -> dict:
        spec = self.cfg.weak
        if spec.trained:
            self.log(f"[w2s] weak model: using the fine-tuned checkpoint {spec.path}")
            return {"model": spec.path, "trained_here": False}
        base = self._base_model("weak", d)
        task = get_task(self.cfg.data.task)
        recs = [sft_record(r, task.gold_completion(r)) for r in self._data("train_1")]
        info = self._sft(base, recs, self.cfg.weak_train, d / "sft", "weak SFT on train_1 gold")
        return {"model": str(d / "sft" / "model"), "trained_here": True, **info}

    def stage_strong_model(self, d: Path) -> dict:
        spec = self.cfg.strong
        base = self._base_model("strong", d)
        pre = spec.pretrain
        if pre.examples <= 0 and spec.path is not None and base.suffix == ".gguf":
            # dequantise once: every later stage loads the native copy (seconds) instead of the GGUF
            m = self.load_model(spec)
            save_model(d / "model", m.params, m.cfg, m.tokenizer)
            distributed.sync("pipeline: strong model converted")
            return {"model": str(d / "model"), "source": str(base)}
        if pre.examples <= 0:
            return {"model": str(base)}
        seen = {r["question"] for s in ("train_1", "train_2", "test") for r in self._data(s)}
        s = pre.synthetic
        want = pre.examples + len(seen)  # generate extra, then drop anything in the task's splits
        raw = (make_arith(want, pre.seed, s.min_steps, s.max_steps, s.max_value, tuple(s.ops), id_prefix="pretrain")
               if s.kind == "arith" else make_synthetic(s.kind, want, pre.seed))
        pool = [r for r in to_records(self.cfg.data.task, raw, "pretrain") if r["question"] not in seen]
        pool = pool[: pre.examples]
        task = get_task(self.cfg.data.task)
        recs = [sft_record(r, task.gold_completion(r)) for r in pool]
        if pre.few_shot_max > 0:
            rng = random.Random(pre.seed)
            zero_shot = [dict(r) for r in recs]
            for i, rec in enumerate(recs):
                others = [zero_shot[j] for j in rng.sample(range(len(recs)), min(len(recs), pre.few_shot_max + 1))
                          if j != i][: rng.randint(0, pre.few_shot_max)]
                rec["prompt"] = few_shot_prompt(pool[i]["question"], others)
        info = self._sft(base, recs, pre.train, d / "pretrain", "strong 'pretraining' on a disjoint pool")
        return {"model": str(d / "pretrain" / "model"), "pretrain_examples": len(recs), **info}

    def stage_weak_labels(self, d: Path) -> dict:
        recs = self._generate(self._weak_dir(), self._data("train_2"), d / "train_2.jsonl", "weak labels (train_2)",
                              gold_free=True)
        return {"counts": _label_stats(recs, self._scores(d / "train_2.jsonl"))}

    def _demos(self) -> tuple[list[dict], bool]:
        """The ICL demonstrations and whether choosing them read train_2 gold."""
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
        s1 = self.cfg.stage1
        weak_path, icl_path = self.path("weak_labels", "train_2.jsonl"), self.path("strong_icl", "train_2.jsonl")
        weak, icl = read_jsonl(weak_path), read_jsonl(icl_path)
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
        recs = full_weak_sft(read_jsonl(self.path("weak_labels", "train_2.jsonl")))
        return {"model": str(d / "sft" / "model"),
                **self._sft(self._strong_base(), recs, self.cfg.strong_train, d / "sft", "full weak FT baseline")}

    def stage_gold(self, d: Path) -> dict:
        if not self.cfg.baselines.gold:
            return {"skipped": True}
        task = get_task(self.cfg.data.task)
        recs = [{"id": r["id"], "prompt": task.prompt(r), "completion": task.gold_completion(r)}
                for r in self._data("train_2")]
        return {"model": str(d / "sft" / "model"),
                **self._sft(self._strong_base(), recs, self.cfg.strong_train, d / "sft", "gold SFT ceiling")}

    def stage_sampling(self, d: Path) -> dict:
        s2 = self.cfg.stage2
        model = Path(self.manifest("stage1")["final"])
        samples = self._generate(model, self._data("train_2"), d / "samples.jsonl", "Stage I model sampling",
                                 n=s2.n_samples, temperature=s2.temperature, top_p=s2.top_p, seed=s2.seed,
                                 max_new_tokens=s2.max_new_tokens, gold_free=True)
        per_sample: list[list[dict]] = [[] for _ in range(s2.n_samples)]
        for r in samples:
            per_sample[r["sample"]].append(r)
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
        pairs = read_jsonl(self.path("sampling", "pairs.jsonl"), allow_empty=True)
        if not pairs:
            msg = "no contrastive pairs (see sampling/pairs.stats.json); Stage II is the Stage I model"
            self.log(f"[w2s] WARNING stage stage2: {msg}")
            return {"model": self.manifest("stage1")["final"], "pairs": 0, "skipped": msg}
        model = self.load_model(Path(self.manifest("stage1")["final"]))
        self.log(f"[w2s] Stage II {self.cfg.stage2.train.loss_type}: {len(pairs)} pairs")
        res = run_dpo(model, pairs, self.cfg.stage2.train, d / "train", mesh=self.mesh,
                      rules=self.cfg.mesh.rules_table(), ref_cache=d / "reference_logps.jsonl")
        return {"model": str(d / "train" / "model"), "pairs": len(pairs), **summary(res)}

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
            write_text_atomic(self.path("results.md"), results_markdown(results))
            try:
                plot_results(results, self.path("results.png"))
            except Exception as e:  # the chart is a convenience; never lose the results for it
                self.log(f"[w2s] warning: could not draw results.png ({e})")
        self.log(results_markdown(results))
        return {"accuracy": {r["model"]: r["accuracy"] for r in rows}}


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


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
