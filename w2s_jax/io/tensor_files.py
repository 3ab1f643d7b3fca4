"""Safetensors files and parameter trees: flattening, streaming writes, sliced reads, sharded placement.

Parameter trees are flattened to dotted names (``layers.wq``); a file is written one layer of one
tensor at a time (:func:`write_safetensors`, a SHA-256 of the file is returned) and read by slice
(:class:`SafetensorsStore`), so that :func:`materialize` can build each device's shard of a
parameter straight from the file. Used by the native format and by the Hugging Face and PEFT
converters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import safe_open

from w2s_jax.core.errors import UserError
from w2s_jax.parallel.distributed import to_host
from w2s_jax.parallel.sharding import Rules, named_sharding

__all__ = ["flatten_tree", "unflatten_tree", "flat_axes", "layer_chunks", "ST_NAMES", "FLOAT_CODES", "dtype_name",
           "Entry", "write_safetensors", "file_sha256", "verify_checksums", "SafetensorsStore", "norm_index",
           "materialize", "shardings_for", "load_tree_from_store"]


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


def flat_axes(axes_tree: dict, prefix: str = "") -> dict[str, tuple]:
    out = {}
    for k, v in axes_tree.items():
        if _is_names(v):
            out[f"{prefix}{k}"] = v
        else:
            out.update(flat_axes(v, f"{prefix}{k}."))
    return out


def layer_chunks(x) -> Iterator[np.ndarray]:
    """A stacked array's bytes layer by layer (one layer on the host at a time)."""
    if x.ndim == 0 or x.shape[0] <= 1 or isinstance(x, np.ndarray):
        yield np.asarray(to_host(x))
        return
    for i in range(x.shape[0]):
        yield to_host(x[i])


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


ST_NAMES = {v: k for k, v in _ST_CODES.items()}


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

    digest = hashlib.sha256()
    header: dict[str, Any] = {}
    off = 0
    for name, shape, dtype, _ in entries:
        dt = np.dtype(dtype)
        if dt not in ST_NAMES:
            raise UserError(f"tensor `{name}`: dtype {dt} cannot be stored in safetensors")
        n = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": ST_NAMES[dt], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
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


def shardings_for(axes_tree: dict, shapes_tree: dict, mesh, rules: Rules) -> dict[str, Any]:
    """Flat name -> NamedSharding (or None without a mesh)."""
    axes = flat_axes(axes_tree)
    flat_shapes = flatten_tree(shapes_tree)
    if mesh is None:
        return {k: None for k in flat_shapes}
    return {k: named_sharding(mesh, axes[k], flat_shapes[k].shape, rules) for k in flat_shapes}


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
