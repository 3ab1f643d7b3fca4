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

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules

__all__ = ["build_prompts", "generate_records", "main"]


def build_prompts(records: Sequence[dict], demos: Sequence[dict] | None = None, where: str = "<input>") -> list[str]:
    """The prompt of each input record (``prompt`` verbatim, else the zero/few-shot prompt of ``question``)."""
    from w2s_jax.method.prompts import few_shot_prompt, zero_shot_prompt

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
    from w2s_jax.method.grading import gold_answer

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
    import json

    from w2s_jax.core.jsonl import write_json_atomic

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
    from w2s_jax.core.jsonl import read_done_ids, read_jsonl
    from w2s_jax.parallel import distributed

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
    import contextlib

    from w2s_jax.core.jsonl import JsonlAppender, check_unique_ids, read_jsonl, write_jsonl_atomic
    from w2s_jax.infer.sampler import Sampler
    from w2s_jax.method.prompts import clean_response
    from w2s_jax.parallel import distributed

    out_path = Path(out_path)
    inputs = list(inputs)
    check_unique_ids(inputs, "<input>")
    prompts = build_prompts(inputs, demos)
    if grade_task is not None:
        from w2s_jax.method.grading import MODES, grade_records

        if grade_mode not in MODES:
            raise UserError(f"unknown grading mode {grade_mode!r}; valid: {MODES}")
        golds = gold_answers(inputs, grade_task)
    else:
        golds = [r.get("gold") for r in inputs]
    sc = sample_cfg
    if sampler is None:
        if model.tokenizer is None:
            raise UserError(f"model {model.source} has no tokenizer; pass one (--tokenizer PATH|byte)")
        scale = model.lora_cfg.scale if model.lora_cfg is not None else 1.0
        sampler = Sampler(model.params, model.cfg, model.tokenizer, mesh=mesh, rules=rules, lora=model.lora,
                          lora_scale=scale)
    main = distributed.is_main_process()
    if not main:
        log = lambda *a, **k: None  # noqa: E731
        progress = False
    distributed.check_shared_dir(out_path.parent)  # (multi-host only)
    index = {r["id"]: i for i, r in enumerate(inputs)}
    existing, done = _existing(out_path, index, sc)

    # encode once, check lengths against the context (error names the id, or left-truncate)
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

    todo = len(inputs) * sc.n - len({p for p in done if p[1] < sc.n})
    if done:
        log(f"[generate] resuming {out_path}: {len(inputs) * sc.n - todo} of {len(inputs) * sc.n} samples done")
    t0 = time.perf_counter()
    c0, k0, tok0 = sampler.compile_seconds, sampler.num_compiled, sampler.stats["tokens"]
    written = 0
    if todo:
        # every process runs the batches (one SPMD program); process 0 writes
        with JsonlAppender(out_path) if main else contextlib.nullcontext() as app:
            for i, j, c in sampler.stream(ids, sc, progress=progress, skip=done, desc=desc):
                written += 1
                if not main:
                    continue
                r = inputs[i]
                rec = {
                    "id": r["id"], "sample": j, "seed": c.seed, "prompt": prompts[i],
                    "response": clean_response(c.text, sc.stop), "num_tokens": c.num_tokens,
                    "finish_reason": c.finish_reason,
                }
                if golds[i] is not None:
                    rec["gold"] = r["gold"] if r.get("gold") is not None else golds[i]
                if grade_task is not None:
                    rec = grade_records([rec], grade_task, mode=grade_mode)[0]
                app.write(rec)
        el = time.perf_counter() - t0
        gen = sampler.stats["tokens"] - tok0
        comp = sampler.compile_seconds - c0
        log(f"[generate] {written} samples, {gen} tokens in {el:.1f}s ({gen / max(el - comp, 1e-9):.1f} tok/s "
            f"excluding compilation); {sampler.num_compiled - k0} programs compiled in {comp:.1f}s")
    # every pair is done: rewrite in input order (atomic), keeping any extra records (other ids/samples)
    if main:
        recs = read_jsonl(out_path, required=("id",), allow_empty=True) if out_path.exists() else []
        order = lambda r: (index.get(r["id"], len(index)), int(r.get("sample", 0)))
        recs.sort(key=order)
        write_jsonl_atomic(out_path, recs)
    distributed.sync("generate: output written")
    if not main:  # the file process 0 wrote (graded, in order)
        recs = read_jsonl(out_path, required=("id",), allow_empty=True) if out_path.exists() else []
    mine = [r for r in recs if r["id"] in index and int(r.get("sample", 0)) < sc.n]
    missing = len(inputs) * sc.n - len({(r["id"], int(r.get("sample", 0))) for r in mine})
    if missing:
        raise RuntimeError(f"{out_path}: {missing} samples missing after generation")  # never expected
    return mine


def main(argv: list[str] | None = None, prog: str = "w2s generate", command: str = "generate") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], epilog="Output format and resuming: see "
        "`python -c 'import w2s_jax.pipeline.generation as m; print(m.__doc__)'`.",
    )
    ap.add_argument("--model", required=True, help="native dir, Hugging Face dir, .gguf file or PEFT adapter dir")
    ap.add_argument("--input", required=True, help="input .jsonl: id + prompt | question [+ gold | answer]")
    ap.add_argument("--output", required=True, help="output .jsonl (streamed; rerun to resume)")
    ap.add_argument("--n", type=int, default=1, help="samples per record (seeds seed..seed+n-1)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16, help="rows (record x sample) per compiled batch")
    ap.add_argument("--stop", action="append", default=None,
                    help="stop string (repeatable; default: Question, Answer)")
    ap.add_argument("--no-stop", action="store_true", help="no stop strings (EOS and --max-new-tokens only)")
    ap.add_argument("--few-shot", default=None, help="demonstrations .jsonl (prompt|question + response|completion)")
    ap.add_argument("--grade", default=None, metavar="TASK", help="add pred/result graded for TASK (e.g. gsm8k)")
    ap.add_argument("--grade-mode", default="paper", choices=["paper", "symbolic"])
    ap.add_argument("--truncate-prompts", action="store_true", help="left-truncate prompts that do not fit")
    ap.add_argument("--mesh", default=None, help="device mesh, e.g. data=-1,tensor=1 (default: one device)")
    ap.add_argument("--base", default=None, help="base model of a PEFT adapter directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path/spec overriding the model's ('byte')")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    ap.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights first")
    ap.add_argument("--no-lora", action="store_true", help="ignore the model's LoRA adapters")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from w2s_jax.core.jsonl import check_streamable, check_unique_ids, read_jsonl, scan_stream
    from w2s_jax.core.paths import check_output_file, check_output_not_input
    from w2s_jax.infer.sampler import SampleConfig
    from w2s_jax.method.prompts import STOP_STRINGS

    check_output_file(args.output)
    check_streamable(args.output)
    check_output_not_input({"--output": args.output}, {"--input": args.input, "--few-shot": args.few_shot})
    stop = () if args.no_stop else tuple(args.stop) if args.stop else STOP_STRINGS
    sc = SampleConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        n=args.n, seed=args.seed, stop=stop, batch_size=args.batch_size, truncate_prompts=args.truncate_prompts,
    )
    if args.grade is not None:
        from w2s_jax.method.tasks import get_task

        get_task(args.grade)
    inputs = read_jsonl(args.input, required=("id",))
    check_unique_ids(inputs, args.input)
    demos = read_jsonl(args.few_shot) if args.few_shot else None
    if demos is not None:
        build_prompts([{"id": "-", "question": "?"}], demos, where=args.few_shot)  # validate the demos early
    build_prompts(inputs, demos, where=args.input)  # fail on a bad record before loading the model
    if args.grade is not None:
        gold_answers(inputs, args.grade, where=args.input)
    import hashlib
    import json

    from w2s_jax.io.native import detect_format, model_fingerprint
    from w2s_jax.parallel import distributed
    from w2s_jax.parallel.locking import hold, lock_path_for_file

    detect_format(args.model)  # a missing or unrecognised model is reported before anything else
    settings = {
        "model": model_fingerprint(args.model, args.base), "tokenizer": args.tokenizer, "dtype": args.dtype,
        "lora": "off" if args.no_lora else "merged" if args.merge_lora else "on",
        "temperature": sc.temperature, "top_k": sc.top_k, "top_p": sc.top_p, "max_new_tokens": sc.max_new_tokens,
        "stop": list(sc.stop), "truncate_prompts": sc.truncate_prompts, "grade": args.grade,
        "grade_mode": args.grade_mode if args.grade else None,
        "few_shot": hashlib.sha256(json.dumps(demos, sort_keys=True).encode()).hexdigest()[:16] if demos else None,
    }
    out = Path(args.output)
    with hold(lock_path_for_file(out), f"output {out}"):
        if out.exists():
            scan_stream(out)  # not a valid output: refused before anything changes
        check_settings(out, settings, write=distributed.is_main_process())
        return _generate(args, sc, inputs, demos)


def _generate(args, sc, inputs: list[dict], demos: list[dict] | None) -> int:
    from w2s_jax.io.native import load_model

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("w2s_jax.infer.sampler").setLevel(logging.INFO)
    from w2s_jax.parallel.sharding import parse_mesh_arg

    mesh = parse_mesh_arg(args.mesh)
    model = load_model(args.model, mesh=mesh, dtype=args.dtype, base=args.base, tokenizer=args.tokenizer)
    if args.no_lora:
        model.lora, model.lora_cfg = None, None
    elif args.merge_lora and model.lora is not None:
        from w2s_jax.models.lora import merge_lora

        model.params = merge_lora(model.params, model.lora, model.cfg, model.lora_cfg.scale)
        model.lora, model.lora_cfg = None, None
    from w2s_jax.infer.sampler import Sampler
    from w2s_jax.io.native import tokenizer_of

    sampler = Sampler(model.params, model.cfg, tokenizer_of(model), mesh=mesh, lora=model.lora,
                      lora_scale=model.lora_cfg.scale if model.lora_cfg is not None else 1.0)
    model.params = None  # the sampler holds what it needs (per-layer weights on CPU)
    recs = generate_records(model, inputs, sc, args.output, demos=demos, grade_task=args.grade,
                            grade_mode=args.grade_mode, mesh=mesh, progress=not args.no_progress, sampler=sampler)
    msg = f"{len(recs)} records ({len(inputs)} ids x {sc.n} samples) in {args.output}"
    if args.grade is not None and recs:
        acc = sum(bool(r.get("result")) for r in recs) / len(recs)
        msg += f"; accuracy {acc:.4f} ({args.grade}, {args.grade_mode})"
    from w2s_jax.parallel import distributed
    if distributed.is_main_process():
        print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
