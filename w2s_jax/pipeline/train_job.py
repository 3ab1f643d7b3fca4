"""A training job of ``w2s sft`` / ``w2s dpo``: its config and the run from records to a saved model.

Config sections (unknown keys are errors naming the key)::

    model:                      # where the model comes from (ModelSpec, w2s_jax/pipeline/model_spec.py)
      path: runs/strong/model   # native dir, Hugging Face dir, .gguf or PEFT adapter dir
      preset: null              # ... or a preset initialised at random (tiny test models)
      overrides: {}             # ModelConfig runtime fields: dtype, param_dtype, remat, ...
      tokenizer: null           # "byte" or a tokenizer dir (default: the checkpoint's own)
      base: null                # base model of a PEFT adapter path
      seed: 0                   # random init of a preset
    data:
      train: data/sft.jsonl     # sft: {id, prompt, completion}; dpo: {id, prompt, chosen, rejected}
      eval: null                # optional held-out file (else train.eval_fraction of train)
      ref_cache: null           # dpo: reference log-probs cache (default <out_dir>/ref_logps.jsonl)
    train: {...}                # TrainConfig (w2s_jax.train.loop)
    mesh: {data: -1, fsdp: 1, tensor: 1, sequence: 1, rules: null}
    out_dir: runs/sft
    export_hf: false            # also write a Hugging Face dir (full FT) or PEFT adapter (LoRA)

The resolved config is written to ``<out_dir>/config.yaml``. Re-running the same job resumes from the
newest valid checkpoint in ``<out_dir>/checkpoints``. While a job runs, ``out_dir`` is locked
(``<out_dir>/.w2s.lock``): a second one there is refused, naming the first one's pid and host.
Multi-host: every host runs the same job with the same ``out_dir``; process 0 writes the config,
metrics and model (and takes the lock), all hosts write their checkpoint shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from w2s_jax.core.config import dump_yaml
from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import read_jsonl
from w2s_jax.parallel import distributed
from w2s_jax.parallel.locking import LOCK_NAME, hold
from w2s_jax.parallel.sharding import MeshConfig
from w2s_jax.pipeline.model_spec import ModelSpec, load_model_spec, resolve_model_spec
from w2s_jax.train.loop import TrainConfig, run_dpo, run_sft

__all__ = ["DataSection", "TrainRunConfig", "SFT_FIELDS", "PREF_FIELDS", "check_text_fields", "read_records",
           "run_train_job"]


@dataclass
class DataSection:
    train: str | None = None
    eval: str | None = None
    ref_cache: str | None = None


@dataclass
class TrainRunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    out_dir: str = "runs/train"
    export_hf: bool = False


SFT_FIELDS = ("id", "prompt", "completion")
PREF_FIELDS = ("id", "prompt", "chosen", "rejected")


def check_text_fields(records: list[dict], fields: tuple[str, ...], path) -> list[dict]:
    """Every text field (all of ``fields`` but ``id``) is a string; else a UserError naming the file, record and id."""
    for i, r in enumerate(records):
        for k in fields:
            if k != "id" and not isinstance(r[k], str):
                raise UserError(f"{path}: record {i + 1} (id {r.get('id')!r}): `{k}` must be a string, got "
                                f"{type(r[k]).__name__} {r[k]!r}")
    return records


def read_records(cfg: TrainRunConfig, kind: str) -> tuple[list[dict], list[dict] | None]:
    """The training records and the optional held-out ones of a job (``kind``: sft or dpo), checked."""
    if cfg.data.train is None:
        raise UserError("set `data.train` (a JSONL file of training records)")
    fields = SFT_FIELDS if kind == "sft" else PREF_FIELDS
    records = check_text_fields(read_jsonl(cfg.data.train, required=fields), fields, cfg.data.train)
    eval_records = (check_text_fields(read_jsonl(cfg.data.eval, required=fields), fields, cfg.data.eval)
                    if cfg.data.eval else None)
    return records, eval_records


def run_train_job(cfg: TrainRunConfig, kind: str, label: str = "train") -> str:
    """Train as ``cfg`` says (``kind``: sft or dpo) holding ``out_dir``'s lock; returns a one-line summary
    (``label``: its first word)."""
    records, eval_records = read_records(cfg, kind)
    out = Path(cfg.out_dir)
    with hold(out / LOCK_NAME, f"output directory {out}"):
        return _train(cfg, kind, label, records, eval_records, out)


def _train(cfg: TrainRunConfig, kind: str, label: str, records, eval_records, out: Path) -> str:
    mesh = cfg.mesh.build()
    rules = cfg.mesh.rules_table()
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main_process():
        dump_yaml(cfg, out / "config.yaml")
    spec = resolve_model_spec(cfg.model, "model")
    model = load_model_spec(spec, mesh, rules, "model")
    if kind == "sft":
        res = run_sft(model, records, cfg.train, out, mesh=mesh, rules=rules, eval_records=eval_records,
                      export_hf=cfg.export_hf)
    else:
        # the cache lives in out_dir (the training data may be read-only) unless data.ref_cache names one
        res = run_dpo(model, records, cfg.train, out, mesh=mesh, rules=rules, eval_records=eval_records,
                      export_hf=cfg.export_hf, ref_cache=cfg.data.ref_cache)
    last = res.history[-1] if res.history else {}
    msg = f"{label}: {res.step} steps"
    if last:
        msg += f", final loss {last['loss']:.4f}"
    if res.eval_history:
        msg += f", eval loss {res.eval_history[-1]['loss']:.4f}"
    return f"{msg}; model in {res.model_dir}"
