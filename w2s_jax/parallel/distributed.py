"""Multi-host execution: start the JAX distributed runtime, feed global batches, split and gather records.

Every host runs the same ``w2s`` command (``tpu_scripts/launch.sh`` does that on all TPU VM workers).
``initialize()`` joins them into one JAX program; after it ``jax.devices()`` lists the devices of
all hosts and one mesh spans them. The rules the rest of the package follows:

- **Batches**: every host builds the same global batch (cheap: token ids from the same seeded
  batcher) and :func:`process_local_batch` turns it into a global ``jax.Array`` from this host's
  part only (``jax.make_array_from_process_local_data``): no host transfers rows it does not own.
- **Evaluation / generation**: :func:`shard_records` gives each host a contiguous slice of the
  records; :func:`gather_records` returns everyone's results, in the original order, on every host.
  (Inside one SPMD generation call the split is implicit in the batch sharding; :func:`to_host`
  fetches a global result array to every host.)
- **Side effects**: only :func:`is_main_process` writes reports, logs and JSONL outputs; Orbax
  checkpoints are written by *all* hosts (each saves its shards); :func:`sync` is a barrier.

Configuration, in order: explicit arguments; ``W2S_COORDINATOR`` (``host:port``),
``W2S_NUM_PROCESSES``, ``W2S_PROCESS_ID``; otherwise, on a Cloud TPU VM slice, SLURM, Open MPI or
Kubernetes job (or when ``W2S_DISTRIBUTED=1``), JAX's own cluster auto-detection; otherwise nothing
(one process). On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from w2s_jax.core.errors import UserError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "W2S_COORDINATOR"
ENV_NUM_PROCESSES = "W2S_NUM_PROCESSES"
ENV_PROCESS_ID = "W2S_PROCESS_ID"
ENV_DISTRIBUTED = "W2S_DISTRIBUTED"


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def detected_cluster() -> str | None:
    """Name of the cluster environment JAX would auto-detect (GCE/GKE TPU, SLURM, Open MPI, k8s), or None."""
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1") and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    if os.environ.get("OMPI_COMM_WORLD_SIZE", "1") not in ("", "1"):
        return "ompi"
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except Exception:  # private API moved: fall back to the explicit switch
        return None
    if running_in_cloud_tpu_vm:
        return "tpu"
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
) -> bool:
    """Join the multi-host JAX runtime when there is one; returns True when this is a multi-process run.

    Safe to call more than once and in single-process runs (then it does nothing).
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    explicit = coordinator is not None
    if explicit:
        if num_processes is None or process_id is None:
            raise UserError(
                f"a coordinator address ({coordinator}) needs the process count and this process's id too "
                f"(arguments or {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})"
            )
        if not 0 <= process_id < num_processes:
            raise UserError(f"process id {process_id} is not in [0, {num_processes})")
        if num_processes == 1:
            return False
    else:
        switch = os.environ.get(ENV_DISTRIBUTED, "").lower()
        if switch in ("0", "false", "no"):
            return False
        cluster = detected_cluster()
        if switch not in ("1", "true", "yes", "auto") and cluster is None:
            return False
    platforms = (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").lower()
    if platforms.startswith("cpu"):
        try:  # CPU processes exchange data for collectives through gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # pragma: no cover - option renamed in another jax
            log.warning("could not select gloo CPU collectives")
    kw: dict[str, Any] = {"initialization_timeout": timeout_s}
    if local_device_ids is not None:
        kw["local_device_ids"] = list(local_device_ids)
    # without a coordinator, JAX fills in what is unset from the detected cluster (TPU VM metadata, ...)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **kw)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on the process that writes reports, logs and outputs (process 0)."""
    return process_index() == 0


def sync(name: str) -> None:
    """Barrier across all processes (a no-op in a single-process run)."""
    if process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- global batches


def local_slices(sharding, global_shape: Sequence[int]) -> tuple[slice, ...]:
    """The block of a global array of ``global_shape`` that this process's devices hold (the part it
    must load). Raises when that part is not one rectangular block (a mesh whose process-local
    devices are interleaved with other processes' along a sharded axis)."""
    shape = tuple(int(d) for d in global_shape)
    idx = sharding.addressable_devices_indices_map(shape)
    out = []
    for d, n in enumerate(shape):
        spans = sorted({(s[d].start or 0, n if s[d].stop is None else s[d].stop) for s in idx.values()})
        lo = cur = spans[0][0]
        for a, b in spans:
            if a > cur:
                raise ValueError(f"this process's shards of axis {d} are not contiguous: {spans}")
            cur = max(cur, b)
        out.append(slice(lo, cur))
    return tuple(out)


def _one(x, sharding, global_shape):
    x = np.asarray(x)
    if global_shape is None:  # x is the whole global array: keep only this process's block
        global_shape = x.shape
        try:
            x = x[local_slices(sharding, global_shape)]
        except ValueError:
            full = x
            return jax.make_array_from_callback(tuple(global_shape), sharding, lambda i: full[i])
    return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))


def process_local_batch(batch, sharding, global_shape=None):
    """A global ``jax.Array`` (or a pytree of them) from this process's part of a batch.

    ``batch``: numpy arrays (a pytree). By default they are the whole global batch, identical on
    every host (each host contributes only its block, see :func:`local_slices`). With
    ``global_shape`` (one shape, or a pytree of shapes like ``batch``) they are only this process's
    block and the global shape is given. ``sharding``: one sharding or a pytree like ``batch``.
    """
    if global_shape is None and process_count() == 1:  # one process: exactly the single-host placement
        return jax.device_put(batch, sharding)
    leaves, treedef = jax.tree.flatten(batch)
    if isinstance(sharding, jax.sharding.Sharding):
        shs = [sharding] * len(leaves)
    else:
        shs = treedef.flatten_up_to(sharding)
    if global_shape is None:
        gss = [None] * len(leaves)
    elif isinstance(global_shape, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in global_shape):
        gss = [tuple(global_shape)] * len(leaves)
    else:
        gss = treedef.flatten_up_to(global_shape)
    return jax.tree.unflatten(treedef, [_one(x, s, g) for x, s, g in zip(leaves, shs, gss)])


def _array_to_host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:  # every process holds the whole value: no collective needed
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(x):
    """The full value of a (possibly multi-host) global array, as numpy, on every process; a pytree
    of arrays gives the same pytree of numpy arrays.

    Call it on every process in the same order: an array sharded across processes is gathered with
    a collective."""
    if all(getattr(a, "is_fully_addressable", True) for a in jax.tree.leaves(x)):
        return jax.tree.map(np.asarray, jax.device_get(x))  # one transfer for the whole tree
    return jax.tree.map(_array_to_host, x)


# ----------------------------------------------------------------------------- records


def _bounds(n: int, parts: int, i: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return start, start + base + (1 if i < extra else 0)


def shard_records(records: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This process's contiguous slice of ``records`` (sizes differ by at most one)."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    a, b = _bounds(len(records), count, index)
    return list(records[a:b])


def allgather_bytes(blob: bytes) -> list[bytes]:
    """Every process's ``blob``, in process order, on every process."""
    if process_count() == 1:
        return [bytes(blob)]
    n = np.asarray([len(blob)], np.int64)
    sizes = np.asarray(multihost_utils.process_allgather(n)).reshape(-1)
    width = max(int(sizes.max()), 1)
    buf = np.zeros((width,), np.uint8)
    buf[: len(blob)] = np.frombuffer(blob, np.uint8)
    allbuf = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), width)
    return [allbuf[i, : int(sizes[i])].tobytes() for i in range(len(sizes))]


def gather_records(local_records: Sequence) -> list:
    """All processes' records (JSON-serialisable), concatenated in process order, on every process.

    With :func:`shard_records` this restores the original order: ``gather_records(shard_records(r))
    == list(r)``.
    """
    blob = json.dumps(list(local_records), ensure_ascii=False).encode()
    out: list = []
    for part in allgather_bytes(blob):
        out.extend(json.loads(part.decode()))
    return out


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every process (a decision all processes must take alike)."""
    if process_count() == 1:
        return bool(flag)
    return all(part == b"1" for part in allgather_bytes(b"1" if flag else b"0"))


def check_shared_dir(path: str | os.PathLike, what: str = "the output directory") -> None:
    """Raise a UserError on every process unless ``path`` is one directory that all processes see
    (process 0 writes the outputs, the others read them back). A no-op in a single-process run."""
    if process_count() == 1:
        return
    d = Path(path)
    marker = d / ".w2s-shared-check"
    token = b""
    if is_main_process():
        d.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex.encode()
        marker.write_bytes(token)
    token = allgather_bytes(token)[0]  # (a collective: process 0 has written the marker by now)
    try:
        seen = marker.read_bytes() == token
    except OSError:
        seen = False
    ok = [part == b"1" for part in allgather_bytes(b"1" if seen else b"0")]  # everyone has read it
    if is_main_process():
        marker.unlink(missing_ok=True)
    if not all(ok):
        missing = [i for i, v in enumerate(ok) if not v]
        raise UserError(
            f"{what} {d} is not shared by all {len(ok)} processes (processes {missing} do not see process 0's "
            "files there); in a multi-host run put it on a file system every host mounts (e.g. a GCS bucket "
            "under /mnt/gcs)"
        )


__all__ = [
    "initialize", "detected_cluster", "is_main_process", "process_index", "process_count", "sync",
    "local_slices", "process_local_batch", "to_host", "shard_records", "gather_records", "allgather_bytes",
    "all_true", "check_shared_dir",
]
