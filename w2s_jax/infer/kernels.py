"""Native XLA:CPU kernels, compiled for the host on first use (XLA FFI custom calls).

Two kernels:

- ``skinny_matmul(x, w)`` = ``x @ w`` for a few rows of ``x`` (float32), the matrix-vector products of
  decoding at batch 1 (see ``csrc/skinny_matmul.cc`` for why it beats XLA:CPU's dot there);
- ``decode_attention(q, k, v, lo, hi)``: one query token per row against the slots ``[lo, hi)`` of its
  row's KV cache, returning softmax partials (see ``csrc/decode_attention.cc``): it reads only the live
  slots of a cache sized for the longest prompt plus ``max_new_tokens``.

The C++ sources ship with the package; the first call compiles them (one library) with the
system's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) against the FFI headers of the
installed jaxlib, for this CPU (``-march=native``), into ``$W2S_KERNEL_CACHE`` (default
``~/.cache/w2s/kernels``), keyed by a hash of the source, compiler, flags, jax version and CPU. Later
processes load the cached library.

Everything degrades gracefully: with no compiler, a failed build or a non-CPU backend,
:func:`available` returns False (with one warning saying why) and callers use XLA's dot. Set
``W2S_CPU_KERNELS=0`` to turn the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

SRC_DIR = Path(__file__).with_name("csrc")
_TARGET = "w2s_skinny_matmul"
_ATTN_TARGET = "w2s_decode_attention"
_SOURCES = ("skinny_matmul.cc", "decode_attention.cc")
_HEADERS = ("w2s_cpu.h",)
# rows of x up to which the Sampler uses skinny_matmul (decode steps of batches up to 16: at 16 rows it still
# beats XLA's dot, 61 against 65 ms per step on the SmolLM2 shape; 38 against 45 ms at 8 rows)
SKINNY_MAX_ROWS = 16
_FLAGS = ("-std=c++17", "-shared", "-fPIC")


def enabled_by_env() -> bool:
    return os.environ.get("W2S_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _cpu_id() -> str:
    model = platform.processor() or platform.machine()
    try:  # the flags decide what -march=native emits
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    model += line
    except OSError:
        pass
    return model


def _build(cxx: str, srcs: list[Path], out: Path) -> None:
    inc = jax.ffi.include_dir()
    base = [cxx, "-O3", *_FLAGS, f"-I{inc}", *map(str, srcs)]
    errors = []
    for arch in (["-march=native"], ["-mcpu=native"], []):
        with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            r = subprocess.run(base[:2] + arch + base[2:] + ["-o", str(tmp_path)], capture_output=True, text=True,
                               timeout=300)
            if r.returncode == 0:
                os.replace(tmp_path, out)  # atomic: concurrent builders never see a partial library
                return
            errors.append(r.stderr.strip()[-2000:])
        finally:
            tmp_path.unlink(missing_ok=True)
    raise RuntimeError("\n".join(errors))


_registered = False


def available() -> bool:
    """Whether the native kernels are enabled, built, loaded and registered (builds them on first call).
    They run on CPU devices; the caller checks that its program is built for the CPU platform."""
    return enabled_by_env() and _load()


_lock = threading.Lock()


def _load() -> bool:
    with _lock:  # one build and one registration even when threads ask at once
        return _load_once()


@functools.cache
def _load_once() -> bool:
    global _registered
    cxx = _compiler()
    if cxx is None:
        log.warning("no C++ compiler found (set CXX): using XLA's dot for decoding (slower at batch 1)")
        return False
    srcs = [SRC_DIR / name for name in _SOURCES]
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            b"\0".join(s.encode() for s in (*(p.read_text() for p in (*srcs, *(SRC_DIR / h for h in _HEADERS))),
                                             version, jax.__version__, _cpu_id(), *_FLAGS))
        ).hexdigest()[:16]
        cache = Path(os.environ.get("W2S_KERNEL_CACHE", Path.home() / ".cache" / "w2s" / "kernels"))
        cache.mkdir(parents=True, exist_ok=True)
        lib_path = cache / f"w2s_kernels-{key}.so"
        if not lib_path.exists():
            log.info("compiling %s with %s", ", ".join(_SOURCES), cxx)
            _build(cxx, srcs, lib_path)
        lib = ctypes.cdll.LoadLibrary(str(lib_path))
        if not _registered:  # once per process (the first library loaded serves the targets)
            jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.W2sSkinnyMatmul), platform="cpu")
            jax.ffi.register_ffi_target(_ATTN_TARGET, jax.ffi.pycapsule(lib.W2sDecodeAttention), platform="cpu")
            _registered = True
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to XLA
        log.warning("native CPU kernels unavailable, using XLA's dot (%s: %s)", type(e).__name__, e)
        return False
    return True


def skinny_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., K] @ w [K, N]`` in float32 with the native kernel (call :func:`available` first)."""
    if x.dtype != jnp.float32 or w.dtype != jnp.float32 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"skinny_matmul needs float32 x [..., K] and w [K, N]; got {x.dtype}{x.shape}, "
                         f"{w.dtype}{w.shape}")
    out = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out)(x, w)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lo: jax.Array, hi: jax.Array):
    """Softmax partials of one query token per row over the cache slots ``[lo[b], hi[b])`` (call
    :func:`available` first): ``q [B, K, G, D]`` (already scaled), ``k``/``v [B, K, S, D]`` (float32),
    ``lo``/``hi [B]`` (int32). Returns ``(o [B, K, G, D], m [B, K, G], l [B, K, G])`` with ``m`` the
    largest score, ``l = sum exp(score - m)`` and ``o = sum exp(score - m) v`` (an empty range: ``m =
    -1e30``, ``l = 0``, ``o = 0``)."""
    if not (q.dtype == k.dtype == v.dtype == jnp.float32) or q.ndim != 4 or k.shape != v.shape or k.ndim != 4 \
            or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"decode_attention needs float32 q [B, K, G, D] and k, v [B, K, S, D]; got "
                         f"{q.dtype}{q.shape}, {k.dtype}{k.shape}, {v.dtype}{v.shape}")
    B, K, G, D = q.shape
    f32 = jnp.float32
    outs = (jax.ShapeDtypeStruct((B, K, G, D), f32), jax.ShapeDtypeStruct((B, K, G), f32),
            jax.ShapeDtypeStruct((B, K, G), f32))
    return jax.ffi.ffi_call(_ATTN_TARGET, outs)(q, k, v, lo.astype(jnp.int32), hi.astype(jnp.int32))
