"""``w2s generate``: batched generation over a JSONL file, streamed to the output, resumable.

    w2s generate --model PATH --input prompts.jsonl --output out.jsonl \\
        [--n 10 --temperature 1.0 --top-k 0 --top-p 1.0 --seed 0 --max-new-tokens 512 --batch-size 16 \\
         --few-shot demos.jsonl --grade gsm8k --mesh data=-1,tensor=1 --truncate-prompts]

Input records: ``id`` (unique) and either ``prompt`` (used verbatim) or ``question`` (turned into the
zero-shot prompt ``Question: {question}\\nAnswer:``, or with ``--few-shot`` the few-shot prompt built
from the demonstrations in that file: records with ``prompt`` (or ``question``) and ``response`` (or
``completion``)); optional ``gold`` (copied to the output) or ``answer`` (used as the gold by
``--grade``).

Output: one record per (id, sample), ``n`` per input record::

    {"id": ..., "sample": j, "seed": seed + j, "prompt": "...", "response": "...",
     "num_tokens": 57, "finish_reason": "eos" | "stop" | "length",
     "gold": "..."                      # when the input has `gold` (or `answer` and --grade is given)
     "pred": "...", "result": true}     # with --grade TASK (grading.grade_records, same pass)

``response`` is the generated text cut before the first stop string (default ``Question``,
``Answer``), stripped of surrounding whitespace and trailing periods (``prompts.clean_response``);
``num_tokens`` counts the generated tokens including the one that ended the row (EOS or the token
completing a stop string). Records are appended (flushed and fsync-ed) as each batch finishes, so
their order follows the sampler's batches (longest prompts first); when every row is done the file is
rewritten atomically in input order (id order of the input, then sample).

Resuming: rerun the same command. Pairs (id, sample) already in the output are skipped (a final line
cut short by a kill is removed first), so nothing is duplicated or lost. A pair whose recorded
``seed`` differs from this run's is an error (the runs would mix two seeds). The model's fingerprint
and the generation settings are recorded beside the output in ``<output>.settings.json``; resuming
with another model or other settings (temperature, top-k/p, max new tokens, stop strings,
demonstrations, grading, dtype, LoRA handling) is refused. ``--n`` may grow between runs.

Safety: the output is locked (``.<output name>.lock`` beside it) so a second ``w2s generate`` to the
same output is refused, naming the holder's pid and host. Before the model is loaded the command checks
the input (unique ids, gold answers with ``--grade``), that the output is not one of the inputs, that
it is a ``.jsonl`` path, and that an existing output file is a valid output (otherwise it is refused
and left unchanged).

A prompt longer than ``max_seq_len - max_new_tokens`` tokens is an error naming its id, unless
``--truncate-prompts`` (its left part is dropped, keeping BOS; the count is printed).

Multi-host: every host runs the same command; the batches are split across all devices, every
process gets every result, and only process 0 writes the output (whose directory must be shared by
all hosts; the others read the final file back).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import (
    JsonlAppender,
    check_streamable,
    check_unique_ids,
    read_done_ids,
    read_jsonl,
    scan_stream,
    write_json_atomic,
    write_jsonl_atomic,
)
from w2s_jax.core.paths import check_output_file, check_output_not_input
from w2s_jax.infer.sampler import SampleConfig, Sampler
from w2s_jax.io import native
from w2s_jax.method.grading import MODES, gold_answer, grade_records
from w2s_jax.method.prompts import clean_response, few_shot_prompt, zero_shot_prompt
from w2s_jax.method.tasks import get_task
from w2s_jax.models.lora import merge_lora
from w2s_jax.parallel import distributed
from w2s_jax.parallel.locking import hold, lock_path_for_file
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, parse_mesh_arg

__all__ = ["build_prompts", "gold_answers", "generate_records", "GenerateJob", "run_generate_job"]


def build_prompts(records: Sequence[dict], demos: Sequence[dict] | None = None, where: str = "<input>") -> list[str]:
    """The prompt of each input record (``prompt`` verbatim, else the zero/few-shot prompt of ``question``)."""
    out = []
    for i, r in enumerate(records):
        if r.get("prompt") is not None:
            out.append(str(r["prompt"]))
        elif r.get("question") is not None:
            q = str(r["question"])
            out.append(few_shot_prompt(q, demos) if demos else zero_shot_prompt(q))
        else:
            raise UserError(f"{where}: record {i + 1} (id {r.get('id')!r}) needs `prompt` or `question`")
    return out


def gold_answers(inputs: Sequence[dict], task, where: str = "<input>") -> list:
    """The gold answer of every input record for grading, or a UserError naming the first without one."""
    golds = []
    for i, r in enumerate(inputs):
        try:
            golds.append(gold_answer(r, task))
        except KeyError:
            raise UserError(f"{where}: record {i + 1} (id {r['id']!r}) has no `gold` or `answer` to grade "
                            "against") from None
    return golds


def settings_path(output: str | Path) -> Path:
    """Where the model fingerprint and generation settings of an output are recorded."""
    p = Path(output)
    return p.parent / f"{p.name}.settings.json"


def check_settings(output: Path, settings: dict, write: bool, log=print) -> None:
    """Refuse to add to ``output`` when it was generated with another model or other settings;
    record ``settings`` beside it (when ``write``) for the next run."""
    sp = settings_path(output)
    if sp.exists():
        try:
            old = json.loads(sp.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise UserError(f"{sp}: unreadable ({e}); delete it together with {output} to start over") from None
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff and output.exists() and output.stat().st_size > 0:
            shown = "; ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in diff)
            raise UserError(
                f"{output} was generated with another model or other settings ({shown}); resuming would mix "
                "them: use another --output, or delete the output and its settings file to start over"
            )
    elif output.exists() and output.stat().st_size > 0:
        log(f"[generate] warning: {output} has no settings file ({sp.name}); cannot check that it was made by "
            "this model with these settings")
    if write:
        write_json_atomic(sp, settings)


def _existing(path: Path, ids: dict, sc) -> tuple[list[dict], set[tuple[int, int]]]:
    """Records already in the output (after repairing a cut-off last line) and the (input index,
    sample) pairs they cover."""
    if distributed.is_main_process() and path.exists():
        read_done_ids(path)  # drops (or completes) a partial final line left by a killed run
    distributed.sync("generate: output repaired")  # every process then reads the same records
    if not path.exists():
        return [], set()
    recs = read_jsonl(path, required=("id",), allow_empty=True)
    done = set()
    for k, r in enumerate(recs):
        j = int(r.get("sample", 0))
        if r["id"] not in ids:
            continue
        if "seed" in r and r["seed"] != sc.seed + j:
            raise UserError(
                f"{path}:{k + 1}: id {r['id']!r} sample {j} was generated with seed {r['seed']}, but this run "
                f"uses seed {sc.seed + j} (--seed {sc.seed}); use another --output or the same --seed"
            )
        done.add((ids[r["id"]], j))
    return recs, done


def generate_records(
    model,
    inputs: Sequence[dict],
    sample_cfg,
    out_path: str | Path,
    *,
    demos: Sequence[dict] | None = None,
    grade_task: Any = None,
    grade_mode: str = "paper",
    mesh=None,
    rules: Rules = DEFAULT_RULES,
    desc: str = "generate",
    progress: bool = True,
    sampler=None,
    log=print,
) -> list[dict]:
    """Generate ``sample_cfg.n`` completions per input record into ``out_path`` (see the module
    docstring for the record shape, streaming and resuming). ``model`` is a ``LoadedModel``
    (its LoRA adapters, if any, are applied unmerged). Returns the output records of ``inputs``
    (``sample < n``) in input order. Multi-host: call on every process; process 0 writes and logs."""
    out_path = Path(out_path)
    inputs = list(inputs)
    check_unique_ids(inputs, "<input>")
    prompts = build_prompts(inputs, demos)
    golds = _golds(inputs, grade_task, grade_mode)
    sc = sample_cfg
    if sampler is None:
        sampler = _model_sampler(model, mesh, rules)
    main = distributed.is_main_process()
    if not main:
        log = lambda *a, **k: None  # noqa: E731
        progress = False
    distributed.check_shared_dir(out_path.parent)  # (multi-host only)
    index = {r["id"]: i for i, r in enumerate(inputs)}
    _, done = _existing(out_path, index, sc)
    ids = _encode_prompts(sampler, prompts, inputs, sc, log)
    todo = len(inputs) * sc.n - len({p for p in done if p[1] < sc.n})
    if done:
        log(f"[generate] resuming {out_path}: {len(inputs) * sc.n - todo} of {len(inputs) * sc.n} samples done")
    if todo:
        make = functools.partial(_output_record, inputs, prompts, golds, sc.stop, grade_task, grade_mode)
        _stream(sampler, ids, sc, out_path, done, make, desc=desc, progress=progress, log=log, main=main)
    return _in_input_order(out_path, inputs, index, sc, main)


def _golds(inputs: list[dict], grade_task: Any, grade_mode: str) -> list:
    """The gold of each input: graded ones must have one (checked now); else the ``gold`` field if any."""
    if grade_task is None:
        return [r.get("gold") for r in inputs]
    if grade_mode not in MODES:
        raise UserError(f"unknown grading mode {grade_mode!r}; valid: {MODES}")
    return gold_answers(inputs, grade_task)


def _model_sampler(model, mesh, rules: Rules) -> Sampler:
    if model.tokenizer is None:
        raise UserError(f"model {model.source} has no tokenizer; pass one (--tokenizer PATH|byte)")
    scale = model.lora_cfg.scale if model.lora_cfg is not None else 1.0
    return Sampler(model.params, model.cfg, model.tokenizer, mesh=mesh, rules=rules, lora=model.lora,
                   lora_scale=scale)


def _encode_prompts(sampler, prompts: list[str], inputs: list[dict], sc, log) -> list[list[int]]:
    """The token ids of every prompt, checked against the context: an error naming the id, or (with
    ``truncate_prompts``) the left part dropped, keeping BOS."""
    ids = sampler.encode(prompts)
    limit = sampler.max_prompt_len(sc)
    bos = getattr(sampler.tokenizer, "bos_id", None)
    truncated = 0
    for i, t in enumerate(ids):
        if len(t) > limit:
            if not sc.truncate_prompts:
                raise UserError(
                    f"id {inputs[i]['id']!r}: prompt has {len(t)} tokens, more than the {limit} that fit "
                    f"(max_seq_len {sampler.cfg.max_seq_len} - max_new_tokens {sc.max_new_tokens}); "
                    "shorten it or pass --truncate-prompts"
                )
            keep = 1 if (bos is not None and t and t[0] == bos) else 0
            ids[i] = t[:keep] + t[len(t) - (limit - keep):]
            truncated += 1
    if truncated:
        log(f"[generate] left-truncated {truncated} of {len(ids)} prompts to {limit} tokens")
    return ids


def _output_record(inputs: list[dict], prompts: list[str], golds: list, stop, grade_task: Any, grade_mode: str,
                   i: int, j: int, c) -> dict:
    """The output record of input ``i``, sample ``j`` (completion ``c``), graded when ``grade_task`` is set."""
    r = inputs[i]
    rec = {
        "id": r["id"], "sample": j, "seed": c.seed, "prompt": prompts[i],
        "response": clean_response(c.text, stop), "num_tokens": c.num_tokens,
        "finish_reason": c.finish_reason,
    }
    if golds[i] is not None:
        rec["gold"] = r["gold"] if r.get("gold") is not None else golds[i]
    if grade_task is not None:
        rec = grade_records([rec], grade_task, mode=grade_mode)[0]
    return rec


def _stream(sampler, ids: list[list[int]], sc, out_path: Path, done: set, make_record: Callable, *, desc: str,
            progress: bool, log, main: bool) -> None:
    """Generate the samples not ``done``; process 0 appends each record as its batch finishes."""
    t0 = time.perf_counter()
    c0, k0, tok0 = sampler.compile_seconds, sampler.num_compiled, sampler.stats["tokens"]
    written = 0
    # every process runs the batches (one SPMD program); process 0 writes
    with JsonlAppender(out_path) if main else contextlib.nullcontext() as app:
        for i, j, c in sampler.stream(ids, sc, progress=progress, skip=done, desc=desc):
            written += 1
            if main:
                app.write(make_record(i, j, c))
    el = time.perf_counter() - t0
    gen = sampler.stats["tokens"] - tok0
    comp = sampler.compile_seconds - c0
    log(f"[generate] {written} samples, {gen} tokens in {el:.1f}s ({gen / max(el - comp, 1e-9):.1f} tok/s "
        f"excluding compilation); {sampler.num_compiled - k0} programs compiled in {comp:.1f}s")


def _in_input_order(out_path: Path, inputs: list[dict], index: dict, sc, main: bool) -> list[dict]:
    """Every pair is done: the output rewritten in input order (atomic; extra records of other ids or
    samples kept) and the records of ``inputs`` returned."""
    if main:
        recs = read_jsonl(out_path, required=("id",), allow_empty=True) if out_path.exists() else []
        recs.sort(key=lambda r: (index.get(r["id"], len(index)), int(r.get("sample", 0))))
        write_jsonl_atomic(out_path, recs)
    distributed.sync("generate: output written")
    if not main:  # the file process 0 wrote (graded, in order)
        recs = read_jsonl(out_path, required=("id",), allow_empty=True) if out_path.exists() else []
    mine = [r for r in recs if r["id"] in index and int(r.get("sample", 0)) < sc.n]
    missing = len(inputs) * sc.n - len({(r["id"], int(r.get("sample", 0))) for r in mine})
    if missing:
        raise RuntimeError(f"{out_path}: {missing} samples missing after generation")  # never expected
    return mine


# --- a generation job: w2s generate --------------------------------------------------------------


@dataclass
class GenerateJob:
    """What ``w2s generate`` does: a model, an input and an output file, and the settings."""

    model: str  # native dir, Hugging Face dir, .gguf file or PEFT adapter dir
    input: str
    output: str
    sample: SampleConfig
    few_shot: str | None = None  # demonstrations .jsonl
    grade: str | None = None  # task to grade for
    grade_mode: str = "paper"
    mesh: str | None = None  # e.g. "data=-1,tensor=1" (default: one device)
    base: str | None = None  # base model of a PEFT adapter directory
    tokenizer: str | None = None
    dtype: str | None = None
    lora: str = "on"  # on | off (ignore the adapters) | merged (folded into the weights first)
    progress: bool = True


def run_generate_job(job: GenerateJob) -> str:
    """Check everything that can be checked before loading the model (outputs, inputs, demonstrations,
    golds, the model's format, the settings of an existing output), then generate under the output's
    lock; returns a one-line summary."""
    check_output_file(job.output)
    check_streamable(job.output)
    check_output_not_input({"--output": job.output}, {"--input": job.input, "--few-shot": job.few_shot})
    if job.grade is not None:
        get_task(job.grade)
    inputs = read_jsonl(job.input, required=("id",))
    check_unique_ids(inputs, job.input)
    demos = read_jsonl(job.few_shot) if job.few_shot else None
    if demos is not None:
        build_prompts([{"id": "-", "question": "?"}], demos, where=job.few_shot)  # validate the demos early
    build_prompts(inputs, demos, where=job.input)  # fail on a bad record before loading the model
    if job.grade is not None:
        gold_answers(inputs, job.grade, where=job.input)
    native.detect_format(job.model)  # a missing or unrecognised model is reported before anything else
    out = Path(job.output)
    with hold(lock_path_for_file(out), f"output {out}"):
        if out.exists():
            scan_stream(out)  # not a valid output: refused before anything changes
        check_settings(out, _settings(job, demos), write=distributed.is_main_process())
        return _generate(job, inputs, demos)


def _settings(job: GenerateJob, demos: list[dict] | None) -> dict:
    """The model fingerprint and the settings recorded beside the output (see :func:`check_settings`)."""
    sc = job.sample
    return {
        "model": native.model_fingerprint(job.model, job.base), "tokenizer": job.tokenizer, "dtype": job.dtype,
        "lora": job.lora,
        "temperature": sc.temperature, "top_k": sc.top_k, "top_p": sc.top_p, "max_new_tokens": sc.max_new_tokens,
        "stop": list(sc.stop), "truncate_prompts": sc.truncate_prompts, "grade": job.grade,
        "grade_mode": job.grade_mode if job.grade else None,
        "few_shot": hashlib.sha256(json.dumps(demos, sort_keys=True).encode()).hexdigest()[:16] if demos else None,
    }


def _generate(job: GenerateJob, inputs: list[dict], demos: list[dict] | None) -> str:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("w2s_jax.infer.sampler").setLevel(logging.INFO)
    mesh = parse_mesh_arg(job.mesh)
    model = native.load_model(job.model, mesh=mesh, dtype=job.dtype, base=job.base, tokenizer=job.tokenizer)
    if job.lora == "off":
        model.lora, model.lora_cfg = None, None
    elif job.lora == "merged" and model.lora is not None:
        model.params = merge_lora(model.params, model.lora, model.cfg, model.lora_cfg.scale)
        model.lora, model.lora_cfg = None, None
    sampler = Sampler(model.params, model.cfg, native.tokenizer_of(model), mesh=mesh, lora=model.lora,
                      lora_scale=model.lora_cfg.scale if model.lora_cfg is not None else 1.0)
    model.params = None  # the sampler holds what it needs (per-layer weights on CPU)
    sc = job.sample
    recs = generate_records(model, inputs, sc, job.output, demos=demos, grade_task=job.grade,
                            grade_mode=job.grade_mode, mesh=mesh, progress=job.progress, sampler=sampler)
    msg = f"{len(recs)} records ({len(inputs)} ids x {sc.n} samples) in {job.output}"
    if job.grade is not None and recs:
        acc = sum(bool(r.get("result")) for r in recs) / len(recs)
        msg += f"; accuracy {acc:.4f} ({job.grade}, {job.grade_mode})"
    return msg
