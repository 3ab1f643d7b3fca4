"""Model directories: what ``load_model`` returns, atomic replacement of an output directory, and
the consistency checks every format's reader and writer share."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax

from w2s_jax.core.errors import UserError
from w2s_jax.io.tensor_files import flatten_tree
from w2s_jax.io.tokenizer import Tokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import LoRAConfig
from w2s_jax.models.params import param_shapes

__all__ = ["LoadedModel", "WRITTEN_MARKER", "atomic_directory", "check_output_dir", "check_tokenizer_vocab",
           "check_params", "read_json"]


@dataclass
class LoadedModel:
    """What ``load_model`` returns. ``lora``/``lora_cfg`` are set for native dirs saved with adapters
    and for PEFT adapter dirs (unmerged; see ``lora.merge_lora``). ``tokenizer`` may be None for a
    Hugging Face directory without tokenizer files (pass ``tokenizer=`` to ``load_model``)."""

    params: dict
    cfg: ModelConfig
    tokenizer: Tokenizer | None
    lora: dict | None = None
    lora_cfg: LoRAConfig | None = None
    source: str = ""
    format: str = ""  # native | hf | gguf | peft


WRITTEN_MARKER = ".w2s-written"  # in every model directory this tool writes


def atomic_directory(out: str | os.PathLike, markers: tuple[str, ...] = (), overwrite: bool = False):
    """Context manager yielding a temporary sibling directory that replaces ``out`` on success.

    Every directory written this way holds :data:`WRITTEN_MARKER`. An existing ``out`` is replaced
    only when it is empty, holds that marker or one of ``markers`` (a native model directory written
    by an earlier version), or ``overwrite`` is set; anything else is refused, before any work,
    rather than deleted."""
    out = Path(out)

    @contextlib.contextmanager
    def cm():
        check_output_dir(out, markers, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        if jax.process_index() == 0:
            tmp.mkdir()
            (tmp / WRITTEN_MARKER).write_text("written by w2s-jax; the directory is replaced when rewritten\n")
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if jax.process_index() == 0:
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
            os.replace(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    return cm()


def check_output_dir(out: str | os.PathLike, markers: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """Refuse an output directory that exists and holds files this tool did not write (see
    :func:`atomic_directory`); ``overwrite`` allows replacing it."""
    out = Path(out)
    if not out.exists():
        for parent in out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UserError(f"output {out}: its parent {parent} is a file, not a directory")
                break
        return
    if not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if overwrite or not any(out.iterdir()):
        return
    if not any((out / m).exists() for m in (WRITTEN_MARKER, *markers)):
        raise UserError(f"refusing to overwrite {out}: it exists, is not empty and was not written by w2s-jax "
                        "(choose an empty or new directory, or pass --overwrite to replace it)")


def check_tokenizer_vocab(tok: Tokenizer | None, cfg: ModelConfig, where: str) -> None:
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise UserError(
            f"{where}: tokenizer has {tok.vocab_size} tokens but the embedding has only {cfg.vocab_size} rows "
            f"(embed shape [{cfg.vocab_size}, {cfg.d_model}]); the tokenizer does not belong to this model"
        )


def check_params(params: dict, cfg: ModelConfig, what: str = "params") -> None:
    """The tree has exactly the parameters of ``cfg`` with the right shapes."""
    want = flatten_tree(param_shapes(cfg))
    got = flatten_tree(params)
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        raise UserError(f"{what}: parameter tree does not match the config: missing {missing}, unexpected {extra}")
    for k, s in want.items():
        if tuple(got[k].shape) != tuple(s.shape):
            raise UserError(f"{what}: parameter `{k}` has shape {tuple(got[k].shape)}, config expects {s.shape}")


def read_json(p: Path) -> dict:
    """A JSON object from a file, or a UserError naming the file."""
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: malformed JSON: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{p}: expected a JSON object")
    return d
