"""Logical axis names, the one rules table that maps them onto a device mesh, and helpers.

Every parameter, cache and activation in w2s-jax is described by a tuple of *logical* axis names
(``("layers", "embed", "heads", "head_dim")``). ``DEFAULT_RULES`` maps each name onto zero or more
*mesh* axes (``data``, ``fsdp``, ``tensor``, ``sequence``). A config may replace the whole table;
it is never patched piecemeal.

Two rules keep specs valid for any model shape on any mesh:
- a mesh axis is used at most once per array (the first logical name claiming it wins), so an
  activation ``("batch", "length", "embed")`` gets ``embed`` unsharded once ``batch`` took ``fsdp``;
- a mesh axis whose size does not divide the dimension is dropped for that array (and counted in
  ``dropped_axes`` so tests and logs can see it), rather than failing to compile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from w2s_jax.core.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical name -> mesh axes (tuple, tried in order)
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ("sequence",)),
    ("cache_length", ()),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("layers", ()),
    ("norm", ()),
    ("lora_rank", ()),
)

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def rules_from_config(table: dict[str, Sequence[str] | str | None] | None) -> Rules:
    """Build a rules table from a config mapping (``{name: [mesh axes]}``); None = the default."""
    if not table:
        return DEFAULT_RULES
    out = []
    for name, axes in table.items():
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise UserError(f"sharding rule `{name}` names unknown mesh axes {bad}; valid: {MESH_AXES}")
        out.append((name, tuple(axes)))
    missing = [n for n, _ in DEFAULT_RULES if n not in dict(out)]
    if missing:
        raise UserError(f"sharding rules table must name every logical axis; missing {missing}")
    return tuple(out)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over ``MESH_AXES``; ``shape`` like ``{"data": -1, "fsdp": 1, "tensor": 1}`` (-1 = the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1})
    unknown = [k for k in shape if k not in MESH_AXES]
    if unknown:
        raise UserError(f"unknown mesh axes {unknown}; valid: {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise UserError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % fixed:
            raise UserError(f"mesh {shape}: {len(devices)} devices not divisible by {fixed}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        if total > len(devices) or len(devices) % total:
            raise UserError(f"mesh {sizes} needs {total} devices, have {len(devices)}")
        devices = devices[:total]
    arr = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)


def parse_mesh_arg(s: str | None) -> Mesh | None:
    """A mesh from a command-line ``--mesh data=-1,tensor=2`` (None when not given)."""
    if not s:
        return None
    shape = {}
    for part in s.split(","):
        if "=" not in part:
            raise UserError(f"--mesh: expected AXIS=SIZE[,AXIS=SIZE...], got {s!r}")
        k, v = part.split("=", 1)
        try:
            shape[k.strip()] = int(v)
        except ValueError:
            raise UserError(f"--mesh: size of `{k}` must be an integer, got {v!r}") from None
    return make_mesh(shape)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axis names (see module doc for the rules)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis `{name}` is not in the sharding rules table")
        axes = []
        size = 1
        for ax in table[name]:
            if ax in used:
                continue
            ax_size = mesh.shape[ax] if mesh is not None else 1
            if mesh is not None and ax_size == 1:
                continue
            if shape is not None and shape[i] % (size * ax_size):
                continue
            axes.append(ax)
            size *= ax_size
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names, shape=None, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree, rules: Rules = DEFAULT_RULES):
    """NamedShardings for a pytree given a matching pytree of logical names and of shapes/arrays."""
    return jax.tree.map(
        lambda names, arr: named_sharding(mesh, names, arr.shape, rules),
        axes_tree,
        shapes_tree,
        is_leaf=_is_names,
    )


def constrain(x: jax.Array, names, mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Pin an activation's layout by logical names (a no-op only when no mesh is given)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape, rules))


def replicated_fraction(shardings_tree, shapes_tree) -> float:
    """Fraction of parameter bytes that are fully replicated (for the 'sufficiently sharded' check)."""
    total = rep = 0
    for sh, arr in zip(jax.tree.leaves(shardings_tree), jax.tree.leaves(shapes_tree)):
        n = math.prod(arr.shape) * np.dtype(arr.dtype).itemsize
        total += n
        if all(p is None for p in sh.spec):
            rep += n
    return rep / max(total, 1)


@dataclass
class MeshConfig:
    """Mesh shape by axis (-1 = the rest of the devices) and an optional replacement rules table."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    rules: dict[str, list[str]] | None = None

    def __post_init__(self):
        for name, v in self.shape().items():
            if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
                raise ValueError(f"{name} must be a positive number of devices or -1 (the rest), got {v!r}")
        if sum(v == -1 for v in self.shape().values()) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self.shape()}")

    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "sequence": self.sequence}

    def build(self, devices=None) -> Mesh:
        return make_mesh(self.shape(), devices)

    def rules_table(self) -> Rules:
        return rules_from_config(self.rules)
