"""Model directories: the native format, and loading any supported checkpoint into sharded arrays.

Native model directory (``save_model``)::

    w2s_model.json       {"format": "w2s-jax", "version": 1, "model": ModelConfig fields,
                          "tokenizer": tokenizer spec (see tokenizer.py), "lora": LoRAConfig fields | null,
                          "checksums": {"params.safetensors": SHA-256, ...}}  (verified on load)
    .w2s-written         marker: a directory w2s-jax wrote (only such a directory is replaced)
    params.safetensors   flattened parameter tree: "embed", "layers.wq", ..., "final_norm", "lm_head"
    lora.safetensors     optional adapters: "layers.wq.a", "layers.wq.b", ...
    tokenizer files      (Hugging Face tokenizers) or w2s_tokenizer.json (the byte tokenizer)

``load_model(path)`` auto-detects a native directory, a Hugging Face safetensors directory (single
file or sharded with ``model.safetensors.index.json``), a ``.gguf`` file, and a PEFT adapter
directory (``adapter_config.json``; the base model comes from ``base=`` or the adapter's
``base_model_name_or_path``). The format-specific readers live in ``convert.py``.

Memory, honestly:

- safetensors sources (native and Hugging Face) are read with ``safe_open(...).get_slice``. With a
  mesh, every parameter is built with ``jax.make_array_from_callback`` and its ``NamedSharding``
  from ``param_shardings(cfg, mesh, rules)``: each device's shard is read from the file straight
  into that shard, one layer at a time, so no host ever holds a whole stacked parameter (a
  replicated parameter is read once per local device). Without a mesh, each parameter is read whole
  on the host and then put on the default device, one parameter at a time.
- GGUF tensors are quantized and cannot be sliced: each stacked parameter is dequantized whole on
  the host (float32) and then ``device_put`` with its sharding, so peak host memory is one stacked
  parameter in float32 (fine for the small models GGUF files are used for here).
- Saving gathers one layer of one parameter at a time to the host (``process_allgather`` when the
  array spans hosts) and streams it into the file; only process 0 writes. The directory is written
  under a temporary name and renamed into place, so an interrupted save never leaves a half model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np

from w2s_jax.core.errors import UserError
from w2s_jax.io.tokenizer import Tokenizer, load_tokenizer
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.lora import LoRAConfig, lora_axes, lora_shapes
from w2s_jax.models.params import param_axes, param_shapes
from w2s_jax.parallel.sharding import DEFAULT_RULES, Rules, named_sharding

META_FILE = "w2s_model.json"
PARAMS_FILE = "params.safetensors"
LORA_FILE = "lora.safetensors"
FORMAT_VERSION = 1

__all__ = [
    "LoadedModel",
    "save_model",
    "load_model",
    "detect_format",
    "flatten_tree",
    "unflatten_tree",
    "SafetensorsStore",
    "write_safetensors",
    "to_host",
    "atomic_directory",
    "check_output_dir",
    "WRITTEN_MARKER",
    "check_tokenizer_vocab",
]


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


# ----------------------------------------------------------------------------- trees


def flatten_tree(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"layers": {"wq": x}}`` -> ``{"layers.wq": x}`` (dict trees only)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_tree(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten_tree(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def _flat_axes(axes_tree: dict, prefix: str = "") -> dict[str, tuple]:
    out = {}
    for k, v in axes_tree.items():
        if _is_names(v):
            out[f"{prefix}{k}"] = v
        else:
            out.update(_flat_axes(v, f"{prefix}{k}."))
    return out


# ----------------------------------------------------------------------------- host transfer


def to_host(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one host numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _layer_chunks(x) -> Iterator[np.ndarray]:
    """A stacked array's bytes layer by layer (one layer on the host at a time)."""
    if x.ndim == 0 or x.shape[0] <= 1 or isinstance(x, np.ndarray):
        yield np.asarray(to_host(x))
        return
    for i in range(x.shape[0]):
        yield to_host(x[i])


# ----------------------------------------------------------------------------- safetensors I/O

_ST_CODES = {
    "F64": np.dtype("float64"),
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("int64"),
    "I32": np.dtype("int32"),
    "I16": np.dtype("int16"),
    "I8": np.dtype("int8"),
    "U8": np.dtype("uint8"),
    "BOOL": np.dtype("bool"),
}
_ST_NAMES = {v: k for k, v in _ST_CODES.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def dtype_name(code: str) -> str:
    """safetensors dtype code -> numpy/jax dtype name ("BF16" -> "bfloat16")."""
    return _ST_CODES[code].name if code in _ST_CODES else code


Entry = tuple[str, tuple[int, ...], Any, Callable[[], Iterable[np.ndarray]]]


def write_safetensors(path: str | os.PathLike, entries: list[Entry], metadata: dict | None = None) -> str:
    """Stream tensors into a safetensors file: ``entries`` are ``(name, shape, dtype, chunks)`` where
    ``chunks()`` yields arrays whose bytes, concatenated, are the tensor (row-major). The header is
    written first from the shapes, so only one chunk is ever in memory. Returns the file's SHA-256
    (hex; computed while writing, on process 0)."""
    import hashlib

    digest = hashlib.sha256()
    header: dict[str, Any] = {}
    off = 0
    for name, shape, dtype, _ in entries:
        dt = np.dtype(dtype)
        if dt not in _ST_NAMES:
            raise UserError(f"tensor `{name}`: dtype {dt} cannot be stored in safetensors")
        n = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _ST_NAMES[dt], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    write = jax.process_index() == 0
    f = open(path, "wb") if write else None
    try:
        if f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            digest.update(struct.pack("<Q", len(hb)))
            digest.update(hb)
        for name, shape, dtype, chunks in entries:
            dt = np.dtype(dtype)
            want = math.prod(shape) * dt.itemsize
            got = 0
            for c in chunks():  # every process takes part in the gathers
                c = np.ascontiguousarray(c)
                if c.dtype != dt:
                    c = c.astype(dt)
                got += c.nbytes
                if f:
                    b = c.tobytes()
                    f.write(b)
                    digest.update(b)
            if got != want:
                raise ValueError(f"tensor `{name}`: wrote {got} bytes, expected {want} for shape {shape} {dt}")
        if f:
            f.flush()
            os.fsync(f.fileno())
    finally:
        if f:
            f.close()
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(directory: Path, checksums: dict, where: str) -> None:
    """Every tensor file recorded in a native model's ``checksums`` has that SHA-256; a mismatch names
    the file (a bit flip or a partial copy)."""
    if not isinstance(checksums, dict):
        raise UserError(f"{where}: `checksums` must be an object of file -> SHA-256")
    for name, want in checksums.items():
        f = directory / name
        if not f.is_file():
            raise UserError(f"{f}: missing (listed in {where})")
        got = file_sha256(f)
        if got != want:
            raise UserError(f"{f}: checksum mismatch (SHA-256 {got[:16]}..., {where} records {str(want)[:16]}...); "
                            "the file is corrupt or was changed after it was written")


class SafetensorsStore:
    """Read tensors by name from one or more safetensors files (a sharded checkpoint), by slice.

    Errors are :class:`UserError` naming the file (corrupt/truncated) or the tensor (missing).
    Use as a context manager (keeps the files open).
    """

    supports_slicing = True

    def __init__(self, files: dict[str, Path] | list[Path], what: str = "checkpoint"):
        from safetensors import safe_open

        self.what = what
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}
        paths = sorted(set(files.values())) if isinstance(files, dict) else list(files)
        for p in paths:
            p = Path(p)
            if not p.is_file():
                raise UserError(f"{what}: file {p} is missing")
            try:
                h = self._stack.enter_context(safe_open(str(p), framework="numpy"))
                for k in h.keys():
                    sl = h.get_slice(k)
                    self._info[k] = (tuple(int(s) for s in sl.get_shape()), sl.get_dtype())
                    self._where[k] = p
            except Exception as e:  # safetensors raises its own error type (and OSError)
                self._stack.close()
                raise UserError(f"{p}: not a readable safetensors file (corrupt or truncated?): {e}") from None
            self._handles[p] = h
        if isinstance(files, dict):  # index: check every listed tensor is where the index says
            for k, p in files.items():
                if k not in self._where:
                    raise UserError(f"{what}: tensor `{k}` listed in the index is not in {p}")

    def __enter__(self) -> SafetensorsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> str:
        """safetensors dtype code: F32, BF16, ..."""
        return self._info[name][1]

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        if name not in self._info:
            raise UserError(f"{self.what}: tensor `{name}` is missing")
        p = self._where[name]
        try:
            sl = self._handles[p].get_slice(name)
            if index is None or len(self._info[name][0]) == 0:
                return np.asarray(sl[:] if self._info[name][0] else self._handles[p].get_tensor(name))
            return np.asarray(sl[tuple(index)])
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{p}: could not read tensor `{name}` (corrupt or truncated file?): {e}") from None


def norm_index(index, shape) -> tuple[slice, ...]:
    """A device-shard index (tuple of slices, possibly with None bounds) with explicit bounds."""
    if index is None:
        index = ()
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("strided shard index")
        out.append(slice(start, stop))
    return tuple(out)


def materialize(
    shape: tuple[int, ...],
    dtype,
    reader: Callable[[tuple[slice, ...]], np.ndarray],
    sharding=None,
    sliceable: bool = True,
) -> jax.Array:
    """Build one parameter. ``reader(index)`` returns the numpy block for a tuple of slices.

    With a sharding and a sliceable source every device shard is read separately
    (``jax.make_array_from_callback``); otherwise the whole array is read once and put on the
    device(s)."""
    dt = jnp.dtype(dtype)

    def read(index):
        idx = norm_index(index, shape)
        a = np.asarray(reader(idx))
        want = tuple(s.stop - s.start for s in idx)
        if a.shape != want:
            raise AssertionError(f"reader returned {a.shape}, expected {want}")
        return a.astype(dt, copy=False)

    if sharding is not None and sliceable:
        return jax.make_array_from_callback(tuple(shape), sharding, read)
    full = read(None)
    if sharding is not None:
        return jax.device_put(full, sharding)
    return jnp.asarray(full)


# ----------------------------------------------------------------------------- directories


WRITTEN_MARKER = ".w2s-written"  # in every model directory this tool writes


def atomic_directory(out: str | os.PathLike, markers: tuple[str, ...] = (), overwrite: bool = False):
    """Context manager yielding a temporary sibling directory that replaces ``out`` on success.

    Every directory written this way holds :data:`WRITTEN_MARKER`. An existing ``out`` is replaced
    only when it is empty, holds that marker or one of ``markers`` (a native model directory written
    by an earlier version), or ``overwrite`` is set; anything else is refused, before any work,
    rather than deleted."""
    import contextlib

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


def _config_from_dict(d: dict, where: str) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise UserError(f"{where}: unknown model config key(s) {unknown} (written by a newer w2s-jax?)")
    try:
        return ModelConfig(**d)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: invalid model config: {e}") from None


def _lora_config_from_dict(d: dict, where: str) -> LoRAConfig:
    fields = {f.name for f in dataclasses.fields(LoRAConfig)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise UserError(f"{where}: unknown LoRA config key(s) {unknown}")
    d = dict(d)
    if "targets" in d:
        d["targets"] = tuple(d["targets"])
    return LoRAConfig(**d)


def save_model(
    directory: str | os.PathLike,
    params: dict,
    cfg: ModelConfig,
    tokenizer: Tokenizer | None,
    lora: dict | None = None,
    lora_cfg: LoRAConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a native model directory (see the module docstring); returns its path.

    Arrays may be sharded (across hosts too): each is gathered to the host one layer at a time.
    Written to a temporary directory and renamed into place (replacing an earlier model dir)."""
    check_params(params, cfg, str(directory))
    if (lora is None) != (lora_cfg is None):
        raise UserError("save_model: pass both `lora` and `lora_cfg`, or neither")
    out = Path(directory)
    with atomic_directory(out, (META_FILE,), overwrite) as tmp:
        tok_spec = None
        if tokenizer is not None and jax.process_index() == 0:
            tok_spec = tokenizer.save(tmp)
        entries = [
            (k, tuple(v.shape), np.dtype(v.dtype), (lambda v=v: _layer_chunks(v)))
            for k, v in flatten_tree(params).items()
        ]
        sums = {PARAMS_FILE: write_safetensors(tmp / PARAMS_FILE, entries, {"format": "w2s-jax"})}
        if lora is not None:
            entries = [
                (k, tuple(v.shape), np.dtype(v.dtype), (lambda v=v: _layer_chunks(v)))
                for k, v in flatten_tree(lora).items()
            ]
            sums[LORA_FILE] = write_safetensors(tmp / LORA_FILE, entries, {"format": "w2s-jax"})
        meta = {
            "format": "w2s-jax",
            "version": FORMAT_VERSION,
            "model": dataclasses.asdict(cfg),
            "tokenizer": tok_spec,
            "lora": None if lora_cfg is None else {**dataclasses.asdict(lora_cfg), "targets": list(lora_cfg.targets)},
            "checksums": sums,  # SHA-256 of each tensor file, verified when loading
        }
        if jax.process_index() == 0:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- loading


def detect_format(path: str | os.PathLike) -> str:
    """``native`` | ``hf`` | ``gguf`` | ``peft`` for a path, or a UserError saying what was expected."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model path {p} does not exist")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        if p.name == META_FILE:
            return "native"
        raise UserError(f"{p}: not a model (expected a directory or a .gguf file)")
    if (p / META_FILE).is_file():
        return "native"
    if (p / "adapter_config.json").is_file():
        return "peft"
    if (p / "config.json").is_file():
        if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
            return "hf"
        if any(p.glob("*.bin")) or any(p.glob("*.pth")):
            raise UserError(
                f"{p}: only safetensors checkpoints are supported (found PyTorch .bin files); convert with "
                "`transformers`: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)"
            )
        raise UserError(f"{p}: has config.json but no model.safetensors or model.safetensors.index.json")
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise UserError(
        f"{p}: not a model directory: expected {META_FILE} (native), config.json + model.safetensors "
        "(Hugging Face), adapter_config.json (PEFT) or a .gguf file"
    )


def shardings_for(axes_tree: dict, shapes_tree: dict, mesh, rules: Rules) -> dict[str, Any]:
    """Flat name -> NamedSharding (or None without a mesh)."""
    flat_axes = _flat_axes(axes_tree)
    flat_shapes = flatten_tree(shapes_tree)
    if mesh is None:
        return {k: None for k in flat_shapes}
    return {k: named_sharding(mesh, flat_axes[k], flat_shapes[k].shape, rules) for k in flat_shapes}


def load_tree_from_store(
    store: SafetensorsStore,
    shapes_tree: dict,
    axes_tree: dict,
    mesh,
    rules: Rules,
    where: str,
) -> dict:
    """Load a tree whose safetensors names are its flattened keys (native params / lora)."""
    shardings = shardings_for(axes_tree, shapes_tree, mesh, rules)
    flat_shapes = flatten_tree(shapes_tree)
    for k, s in flat_shapes.items():
        if k not in store:
            raise UserError(f"{where}: tensor `{k}` is missing (expected shape {tuple(s.shape)})")
        if store.shape(k) != tuple(s.shape):
            raise UserError(f"{where}: tensor `{k}` has shape {store.shape(k)}, expected {tuple(s.shape)}")
        if store.dtype(k) not in FLOAT_CODES:
            raise UserError(f"{where}: tensor `{k}` has dtype {store.dtype(k)}, expected a float type")
    out = {}
    for k, s in flat_shapes.items():
        out[k] = materialize(s.shape, s.dtype, lambda idx, k=k: store.read(k, idx), shardings[k])
    return unflatten_tree(out)


def _load_native(path: Path, mesh, rules, dtype, tokenizer) -> LoadedModel:
    if path.is_file():
        path = path.parent
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: malformed JSON: {e}") from None
    if meta.get("format") != "w2s-jax" or "model" not in meta:
        raise UserError(f"{meta_path}: not a w2s-jax model file (missing format/model)")
    if meta.get("version", 1) > FORMAT_VERSION:
        raise UserError(f"{meta_path}: format version {meta['version']} is newer than this w2s-jax ({FORMAT_VERSION})")
    cfg = _config_from_dict(meta["model"], str(meta_path))
    if dtype is not None:
        cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif meta.get("tokenizer"):
        tok = load_tokenizer(meta["tokenizer"], base_dir=path)
    else:
        tok = None
    check_tokenizer_vocab(tok, cfg, str(path))
    if "checksums" in meta:  # (directories written before checksums were recorded have none)
        verify_checksums(path, meta["checksums"], str(meta_path))
    with SafetensorsStore([path / PARAMS_FILE], what=str(path / PARAMS_FILE)) as store:
        params = load_tree_from_store(store, param_shapes(cfg), param_axes(cfg), mesh, rules, str(path / PARAMS_FILE))
    lora = lora_cfg = None
    if meta.get("lora"):
        lora_cfg = _lora_config_from_dict(meta["lora"], str(meta_path))
        with SafetensorsStore([path / LORA_FILE], what=str(path / LORA_FILE)) as store:
            shapes = lora_shapes(cfg, lora_cfg, jnp.float32)
            lora = load_tree_from_store(store, shapes, lora_axes(cfg, lora_cfg), mesh, rules, str(path / LORA_FILE))
    return LoadedModel(params, cfg, tok, lora, lora_cfg, str(path), "native")


def load_model(
    path: str | os.PathLike,
    mesh=None,
    rules: Rules = DEFAULT_RULES,
    dtype=None,
    base: str | os.PathLike | None = None,
    tokenizer=None,
) -> LoadedModel:
    """Load any supported checkpoint (format auto-detected, see the module docstring).

    ``mesh``: place every parameter directly with its NamedSharding (``param_shardings``).
    ``dtype``: parameter dtype (default: native = as saved in w2s_model.json; HF = the stored float
    type of the embedding; GGUF = float32). For HF/GGUF the compute dtype (``cfg.dtype``) is float32
    for float32 parameters and bfloat16 otherwise; change it with ``cfg.replace(dtype=...)``.
    LoRA adapters are always loaded in float32. ``base``: base model of a PEFT adapter dir (overrides
    ``base_model_name_or_path``). ``tokenizer``: a spec/path overriding the model's own.
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "native":
        return _load_native(p, mesh, rules, dtype, tokenizer)
    from w2s_jax.io import convert
    if fmt == "hf":
        return convert.load_hf(p, mesh=mesh, rules=rules, dtype=dtype, tokenizer=tokenizer)
    if fmt == "gguf":
        if p.is_dir():
            p = sorted(p.glob("*.gguf"))[0]
        return convert.load_gguf(p, mesh=mesh, rules=rules, dtype=dtype, tokenizer=tokenizer)
    return convert.load_peft(p, base=base, mesh=mesh, rules=rules, dtype=dtype, tokenizer=tokenizer)


def tokenizer_of(model: LoadedModel) -> Tokenizer:
    """The model's tokenizer or a UserError saying how to supply one."""
    if model.tokenizer is None:
        raise UserError(f"model {model.source} has no tokenizer files; pass a tokenizer (--tokenizer PATH|byte)")
    return model.tokenizer


__all__ += ["tokenizer_of", "materialize", "shardings_for", "load_tree_from_store", "check_params"]


def model_fingerprint(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A fingerprint of the model files at ``path`` (and of ``base`` for a PEFT adapter), cheap to take
    before loading: every file's name and size plus a hash of its first and last MiB (for a native
    directory the recorded per-file checksums cover the whole content). Different models give
    different fingerprints; copying or moving a model keeps its fingerprint."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name if p.is_file() else f.relative_to(p).as_posix()}:{size};".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    if base is not None:
        h.update(model_fingerprint(base).encode())
    return h.hexdigest()[:16]


__all__ += ["model_fingerprint"]
