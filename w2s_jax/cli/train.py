"""``w2s sft`` and ``w2s dpo``: train from a YAML config plus dotted ``--set key=value`` overrides.

Config sections (unknown keys are errors naming the key)::

    model:                      # where the model comes from
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

The resolved config is written to ``<out_dir>/config.yaml``. Re-running the same command resumes
from the newest valid checkpoint in ``<out_dir>/checkpoints``. While a command runs, ``out_dir`` is
locked (``<out_dir>/.w2s.lock``): a second one there is refused, naming the first one's pid and host.
Multi-host: every host runs the same command with the same ``out_dir``; process 0 writes the config,
metrics and model (and takes the lock), all hosts write their checkpoint shards.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError
from w2s_jax.parallel.sharding import MeshConfig
from w2s_jax.train.loop import TrainConfig


@dataclass
class ModelSection:
    path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    base: str | None = None
    seed: int = 0


@dataclass
class DataSection:
    train: str | None = None
    eval: str | None = None
    ref_cache: str | None = None


@dataclass
class TrainRunConfig:
    model: ModelSection = field(default_factory=ModelSection)
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


def load_run_model(m: ModelSection, mesh, rules):
    """A ``LoadedModel``-like object from the model section."""
    from w2s_jax.models.config import get_preset
    from w2s_jax.train.loop import TrainModel

    if (m.path is None) == (m.preset is None):
        raise UserError("set exactly one of `model.path` and `model.preset`")
    if m.path is not None:
        from w2s_jax.io.native import load_model

        model = load_model(m.path, mesh=mesh, rules=rules, base=m.base, tokenizer=m.tokenizer)
        if m.overrides:
            model.cfg = _replace_cfg(model.cfg, m.overrides)
        return model
    import jax

    from w2s_jax.io.tokenizer import load_tokenizer
    from w2s_jax.models.params import init_params

    cfg = _replace_cfg(get_preset(m.preset), m.overrides)
    tok = load_tokenizer(m.tokenizer or "byte")
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer vocab {tok.vocab_size} > model.vocab_size {cfg.vocab_size}; "
                        f"set model.overrides.vocab_size")
    params = init_params(cfg, jax.random.PRNGKey(m.seed), mesh, rules)
    return TrainModel(params, cfg, tok)


def _replace_cfg(cfg, overrides: dict):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cfg)}
    bad = [k for k in overrides if k not in names]
    if bad:
        import difflib

        close = difflib.get_close_matches(bad[0], names, n=1)
        hint = f" (did you mean `model.overrides.{close[0]}`?)" if close else ""
        raise UserError(f"unknown key `model.overrides.{bad[0]}`{hint}")
    try:
        return cfg.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise UserError(f"model.overrides: {e}") from None


def main(argv: list[str] | None = None, prog: str = "w2s sft", command: str = "sft") -> int:
    from w2s_jax.core.config import load_config

    kind = "dpo" if command == "dpo" else "sft"
    ap = argparse.ArgumentParser(
        prog=prog,
        description=("supervised fine-tuning" if kind == "sft" else "preference optimisation (DPO, IPO, hinge, "
                     "ORPO, SimPO)") + " from a YAML config; re-running resumes from the last checkpoint",
    )
    ap.add_argument("--config", required=False, help="YAML config (sections: model, data, train, mesh, out_dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, e.g. --set train.lr=1e-5 (repeatable)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    cfg: TrainRunConfig = load_config(TrainRunConfig, args.config, args.overrides)
    if cfg.data.train is None:
        raise UserError("set `data.train` (a JSONL file of training records)")
    from w2s_jax.core.jsonl import read_jsonl

    fields = SFT_FIELDS if kind == "sft" else PREF_FIELDS
    records = check_text_fields(read_jsonl(cfg.data.train, required=fields), fields, cfg.data.train)
    eval_records = (check_text_fields(read_jsonl(cfg.data.eval, required=fields), fields, cfg.data.eval)
                    if cfg.data.eval else None)

    from w2s_jax.parallel.locking import LOCK_NAME, hold

    out = Path(cfg.out_dir)
    with hold(out / LOCK_NAME, f"output directory {out}"):
        return _train(cfg, kind, prog, records, eval_records, out)


def _train(cfg: TrainRunConfig, kind: str, prog: str, records, eval_records, out: Path) -> int:
    from w2s_jax.core.config import dump_yaml
    from w2s_jax.parallel import distributed

    mesh = cfg.mesh.build()
    rules = cfg.mesh.rules_table()
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main_process():
        dump_yaml(cfg, out / "config.yaml")
    model = load_run_model(cfg.model, mesh, rules)

    from w2s_jax.train import loop as T
    if kind == "sft":
        res = T.run_sft(model, records, cfg.train, out, mesh=mesh, rules=rules, eval_records=eval_records,
                        export_hf=cfg.export_hf)
    else:
        # the cache lives in out_dir (the training data may be read-only) unless data.ref_cache names one
        res = T.run_dpo(model, records, cfg.train, out, mesh=mesh, rules=rules, eval_records=eval_records,
                        export_hf=cfg.export_hf, ref_cache=cfg.data.ref_cache)
    last = res.history[-1] if res.history else {}
    msg = f"{prog}: {res.step} steps"
    if last:
        msg += f", final loss {last['loss']:.4f}"
    if res.eval_history:
        msg += f", eval loss {res.eval_history[-1]['loss']:.4f}"
    if distributed.is_main_process():
        print(f"{msg}; model in {res.model_dir}")
    return 0
