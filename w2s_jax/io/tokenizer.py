"""Tokenizers and the one BOS/EOS policy shared by training, scoring and generation.

Two implementations with one interface:

- :class:`ByteTokenizer`: built in, no files. Ids 0..255 are UTF-8 bytes, then ``pad=256``,
  ``bos=257``, ``eos=258`` (``vocab_size`` 259). Used by the offline demo's tiny from-scratch models.
- :class:`HFTokenizer`: ``transformers.AutoTokenizer`` from a local directory, or a fast tokenizer
  built from a GGUF file's own metadata (:func:`gguf_fast_tokenizer`: vocabulary, merges, special
  tokens and pre-tokenizer read with the ``gguf`` package and assembled with ``tokenizers``; no torch).

Interface: ``encode(text) -> list[int]`` (no special tokens), ``decode(ids) -> str`` (skips special
tokens), ``bos_id``/``eos_id``/``pad_id`` (``pad_id`` falls back to ``eos_id``), ``add_bos``,
``vocab_size``, ``spec`` (JSON-able; ``load_tokenizer(spec)`` rebuilds the tokenizer) and
``save(dir) -> spec`` (copies the tokenizer files into a model directory and returns the spec to store
there, with a path relative to that directory).

The policy (:func:`encode_prompt`, :func:`encode_example`, :func:`decode_generation`):

- a prompt is ``[bos] + encode(prompt)``. BOS is added only when the tokenizer has one *and* the
  tokenizer itself adds it by default (``add_bos``): Llama 2/3, Mistral and Gemma do, SmolLM2
  (whose ``bos`` is ``<|im_start|>``) does not; the byte tokenizer does.
- a training/scoring example is the prompt followed by ``" " + completion`` (the paper joins prompt
  and completion with one space) and ``eos``. Sentencepiece/BPE tokenizers may merge characters
  across the prompt/completion boundary, so the example is tokenized as a whole
  (``prompt + " " + completion``) and the prompt length is the length of the longest common prefix
  of that and the separately tokenized prompt (what TRL does). Every token after that boundary counts
  as a completion token. For the usual case (the prompt's tokens are a prefix of the whole) this is
  exactly ``encode_prompt(prompt)``, i.e. what generation conditions on.
- generation conditions on ``encode_prompt(prompt)``, stops at ``eos``, decodes the generated ids
  (skipping special tokens) and strips surrounding whitespace (the leading space of the join).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from w2s_jax.core.errors import UserError

SPEC_FILE = "w2s_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; pad=256, bos=257, eos=258."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259
    add_bos = True
    spec = {"type": "byte"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> dict:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / SPEC_FILE).write_text(json.dumps(self.spec) + "\n")
        return dict(self.spec)

    def to_hf(self):
        """An equivalent ``transformers`` fast tokenizer (byte-level BPE without merges, same ids),
        so a model exported to a Hugging Face directory keeps a working tokenizer."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        b2u = bytes_to_unicode()
        vocab = {b2u[b]: b for b in range(256)}
        vocab.update({"<pad>": self.pad_id, "<s>": self.bos_id, "</s>": self.eos_id})
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
        from tokenizers.processors import TemplateProcessing

        tk.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 257)])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        return tok

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A ``transformers`` tokenizer behind the common interface."""

    def __init__(self, tok, spec: dict):
        self.tok = tok
        self.spec = dict(spec)
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        if self.eos_id is None:
            raise UserError(f"tokenizer {spec.get('path')} has no eos token; set one in its tokenizer_config.json")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tok)
        if self.bos_id is None:
            self.add_bos = False
        else:
            probe = tok("a", add_special_tokens=True)["input_ids"]
            self.add_bos = bool(probe) and probe[0] == self.bos_id

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, gguf_file: str | None = None) -> HFTokenizer:
        from transformers import AutoTokenizer

        p = Path(path)
        if gguf_file is None and p.is_file() and p.suffix == ".gguf":
            p, gguf_file = p.parent, p.name
        if not p.is_dir():
            raise UserError(f"tokenizer directory {p} does not exist")
        try:
            if gguf_file:
                tok = gguf_fast_tokenizer(p / gguf_file)
            else:
                tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            what = p / gguf_file if gguf_file else p
            raise UserError(f"could not load a tokenizer from {what}: {e}") from None
        spec: dict[str, Any] = {"type": "hf", "path": str(p)}
        if gguf_file:
            spec["gguf_file"] = gguf_file
        return cls(tok, spec)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> dict:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save_pretrained(str(d))
        return {"type": "hf", "path": "."}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec})"


Tokenizer = ByteTokenizer | HFTokenizer


# ----------------------------------------------------------------------------- GGUF

# llama.cpp's `tokenizer.ggml.pre` names -> how the text is split before byte-level BPE. The split
# regexes are llama.cpp's (llama-vocab.cpp) and the ones in each model's own tokenizer.json.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")
_GPT2_PRE = (None, "default", "gpt2", "gpt-2")


def read_gguf_tokenizer(path: str | os.PathLike) -> dict:
    """The tokenizer a GGUF file describes: its ``tokenizer.ggml.*`` metadata (read with ``gguf``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    meta = {k: field(f"tokenizer.ggml.{k}") for k in (
        "model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
        "padding_token_id", "add_bos_token", "add_eos_token")}
    if not meta["tokens"]:
        raise ValueError(f"{path}: the GGUF file has no tokenizer (no `tokenizer.ggml.tokens`)")
    return meta


def gguf_fast_tokenizer(path: str | os.PathLike):
    """A ``transformers.PreTrainedTokenizerFast`` built from a GGUF file's metadata with ``gguf`` and
    ``tokenizers`` only (no torch): byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM, Llama 3,
    ...) with the file's vocabulary, merges, control tokens and pre-tokenizer. Same ids as
    ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``. Other tokenizer models (sentencepiece
    ``llama``, ...) go through that transformers loader, which needs torch."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as TkTokenizer
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf_tokenizer(path)
    pre = meta["pre"]
    if meta["model"] != "gpt2" or pre not in (*_DIGITS_THEN_GPT2, *_LLAMA3_PRE, *_GPT2_PRE):
        return _transformers_gguf_tokenizer(Path(path), f"tokenizer model {meta['model']!r} (pre {pre!r})")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = list(meta["tokens"])
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in (meta["merges"] or [])]
    tk = TkTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False))
    if pre in _DIGITS_THEN_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in _LLAMA3_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    types = list(meta["token_type"] or [])
    # control tokens (type 3) stay whole and are special (skipped when decoding); user-defined (4) stay whole.
    # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel and is left alone.
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet])
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4])

    def name(key: str) -> str | None:
        i = meta[key]
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = name("bos_token_id")
    if meta["add_bos_token"] and bos is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, int(meta["bos_token_id"]))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=name("eos_token_id"),
                                   unk_token=name("unknown_token_id"), pad_token=name("padding_token_id"))


def _transformers_gguf_tokenizer(path: Path, what: str):
    try:
        import torch  # noqa: F401  (transformers' GGUF tokenizer loader reads the file with torch)
    except ImportError:
        raise UserError(f"{path}: {what} is not built in; transformers' GGUF loader for it needs torch "
                        "(pip install torch), or give a tokenizer directory with `tokenizer=`") from None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def load_tokenizer(spec_or_path, base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Build a tokenizer from a spec dict, a path or the string ``"byte"``.

    Paths: a ``.gguf`` file; a directory with ``w2s_tokenizer.json`` or ``w2s_model.json`` (the
    tokenizer stored with a native model); a directory with Hugging Face tokenizer files. Relative
    paths in a spec are resolved against ``base_dir``.
    """
    if isinstance(spec_or_path, ByteTokenizer | HFTokenizer):
        return spec_or_path
    if isinstance(spec_or_path, dict):
        spec = spec_or_path
        kind = spec.get("type")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "hf":
            if "path" not in spec:
                raise UserError(f"tokenizer spec {spec} has no `path`")
            p = Path(spec["path"])
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            return HFTokenizer.from_pretrained(p, spec.get("gguf_file"))
        raise UserError(f"unknown tokenizer type {kind!r} in spec {spec}; valid: 'byte', 'hf'")
    s = str(spec_or_path)
    if s == "byte":
        return ByteTokenizer()
    p = Path(s)
    if p.is_file() and p.suffix == ".gguf":
        return HFTokenizer.from_pretrained(p.parent, p.name)
    if p.is_dir():
        if (p / SPEC_FILE).is_file():
            return load_tokenizer(json.loads((p / SPEC_FILE).read_text()), base_dir=p)
        if (p / "w2s_model.json").is_file():
            meta = json.loads((p / "w2s_model.json").read_text())
            if meta.get("tokenizer"):
                return load_tokenizer(meta["tokenizer"], base_dir=p)
        return HFTokenizer.from_pretrained(p)
    raise UserError(f"tokenizer not found: {p} (expected 'byte', a .gguf file or a directory)")


# ----------------------------------------------------------------------------- policy


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """``[bos] + encode(prompt)`` (bos only when ``tok.add_bos``): what generation conditions on."""
    ids = tok.encode(prompt)
    return ([tok.bos_id] + ids) if tok.add_bos else ids


def encode_example(tok: Tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """``(ids, n_prompt)`` for ``prompt + " " + completion + eos``.

    ``ids[:n_prompt]`` is the prompt, the rest (including the final eos) is the completion whose
    log-probability training and scoring use. The whole text is tokenized at once and ``n_prompt``
    is the longest common prefix with :func:`encode_prompt`, so a token merged across the boundary
    counts as completion (see the module docstring).
    """
    p_ids = encode_prompt(tok, prompt)
    full = encode_prompt(tok, prompt + " " + completion)
    n = 0
    for a, b in zip(p_ids, full):
        if a != b:
            break
        n += 1
    return full + [tok.eos_id], n


def decode_generation(tok: Tokenizer, ids) -> str:
    """Generated ids (without the prompt) to text: cut at the first eos, decode, strip."""
    out = []
    for i in ids:
        i = int(i)
        if i == tok.eos_id:
            break
        out.append(i)
    return tok.decode(out).strip()
