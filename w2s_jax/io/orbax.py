"""Training checkpoints: Orbax ``CheckpointManager`` with verification and fallback.

Each checkpoint step holds two items: ``state`` (the whole ``TrainState``: step, trainable
parameters, optimizer state, RNG; saved sharded, restored straight into abstract, already-sharded
targets) and ``meta`` (JSON: the data position, the step, a config fingerprint and an exact
checksum of every state leaf). Saves are asynchronous where the backend allows: Orbax copies the
arrays off the device before ``save`` returns, so the donated state may be reused at once, and
writes/finalises in the background; a step directory appears only once finalised (local paths
and ``gs://`` alike).

Restoring walks the steps newest first. A step that fails to restore, or whose restored leaves do
not match the recorded checksums (a truncated or garbled file, a missing item), is reported with a
warning and the previous step is tried; when the run later saves that step number again, the broken
directory is moved aside first (``<dir>.corrupt/<step>-<time>``; deleted on remote storage). A save
killed before it was finalised leaves only a temporary directory, which is ignored and cleaned up.
If every step fails (e.g. the config changed), restoring raises a ``UserError`` instead of starting
over silently.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.core.errors import UserError

log = logging.getLogger(__name__)


class CheckpointWarning(UserWarning):
    pass


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Exact, order-independent checksum of an array's bits: sum of its 32-bit words (mod 2**32)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    nbytes = x.dtype.itemsize
    if x.dtype == jnp.bool_:
        w = x.astype(jnp.uint32)
    elif nbytes == 4:
        w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif nbytes == 2:
        w = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif nbytes == 1:
        w = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    else:  # 8-byte types (x64 mode): two words
        w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    # weight by position so that swapped values change the sum
    idx = jnp.arange(w.size, dtype=jnp.uint32).reshape(w.shape) * jnp.uint32(2654435761)
    return jnp.sum(w ^ idx, dtype=jnp.uint32) + jnp.uint32(w.size)


_leaf_checksum_jit = jax.jit(_leaf_checksum)


def tree_checksums(tree) -> list[int]:
    """One integer per leaf (in ``jax.tree.leaves`` order); identical for identical bits, whatever
    the sharding."""
    sums = [_leaf_checksum_jit(x) for x in jax.tree.leaves(tree)]
    return [int(v) for v in jax.device_get(sums)]


def _is_remote(path: str) -> bool:
    return "://" in str(path)


@dataclass
class Restored:
    step: int
    state: Any
    meta: dict


class Checkpointer:
    """Save every ``save_every`` steps (and whenever ``force``), keep the newest ``keep``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = str(directory) if _is_remote(str(directory)) else os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # a save killed half-way leaves a tmp dir: remove it
        )
        self._ocp = ocp
        self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))
        self._broken: set[int] = set()

    # ------------------------------------------------------------------ save

    def save(self, step: int, state, meta: dict) -> bool:
        ocp = self._ocp
        if step in self._broken:
            self._quarantine(step)
        meta = dict(meta, step=int(step), checksums=tree_checksums(state), saved_at=time.time())
        ok = self.mngr.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        return bool(ok)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()

    def all_steps(self) -> list[int]:
        self.mngr.reload()
        return sorted(self.mngr.all_steps())

    # ------------------------------------------------------------------ restore

    def restore(self, step: int, abstract_state) -> Restored:
        ocp = self._ocp
        out = self.mngr.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        state, meta = out["state"], dict(out["meta"])
        want = meta.get("checksums")
        if want is None:
            raise ValueError("checkpoint metadata has no checksums")
        got = tree_checksums(state)
        if list(want) != got:
            bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
            names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
            shown = ", ".join(names[i] for i in bad[:3]) or "(leaf count differs)"
            raise ValueError(f"checksum mismatch in {len(bad) or 'some'} leaves ({shown})")
        return Restored(int(step), state, meta)

    def restore_latest(self, abstract_state) -> Restored | None:
        """The newest step that restores and verifies, or None when there are no checkpoints.

        A broken newer step is reported with a warning and skipped (and moved aside only once
        this run is about to save over its step number). When every step fails -- most likely the
        config changed, not corruption -- a ``UserError`` lists them rather than silently
        starting over."""
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 -- any failure means: use the previous one
                errors.append(f"step {step}: {failure_reason(e)}")
                msg = (f"checkpoint step {step} ({os.path.join(str(self.directory), str(step))}) is unusable: "
                       f"{failure_reason(e)}; falling back to the previous checkpoint")
                warnings.warn(msg, CheckpointWarning, stacklevel=2)
                log.warning(msg)
                self._broken.add(step)
        if steps:
            raise UserError(
                f"no usable checkpoint in {self.directory} (does it belong to another config?):\n  "
                + "\n  ".join(errors) + "\nremove the directory to start over"
            )
        return None

    def _quarantine(self, step: int) -> None:
        path = os.path.join(self.directory, str(step))
        try:
            if _is_remote(self.directory):
                self.mngr.delete(step)
            elif os.path.isdir(path):
                dest = os.path.join(os.path.dirname(self.directory),
                                    os.path.basename(self.directory) + ".corrupt")
                os.makedirs(dest, exist_ok=True)
                target = os.path.join(dest, f"{step}-{int(time.time())}")
                shutil.move(path, target)
        except Exception as e:  # noqa: BLE001
            log.warning("could not move aside broken checkpoint %s: %s", path, e)
        self._broken.discard(step)
        self.mngr.reload()


def failure_reason(e: BaseException, limit: int = 160) -> str:
    """One short line for why a checkpoint failed to restore: the first line of the message without
    TensorStore's ``[source locations=...]`` / ``[tensorstore_spec=...]`` dumps."""
    text = str(e)
    text = re.sub(r"\s*\[(source locations|tensorstore_spec|tensorstore_status)=.*?\](?=\s*(\[|$))", "", text,
                  flags=re.S)
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def to_host_meta(obj) -> Any:
    """JSON-friendly copy (numpy scalars to Python)."""
    if isinstance(obj, dict):
        return {k: to_host_meta(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_host_meta(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
