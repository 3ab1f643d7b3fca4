"""Accelerator facts: TPU chips and slices (gcloud names -> libtpu topologies) and GPUs for MFU tables.

Numbers are the vendors' published per-chip figures (Cloud TPU system-architecture pages; NVIDIA
data sheets, dense bf16 without sparsity). HBM capacity is the marketing figure in GiB, which is what
the runtime reports as the device's memory limit (a few hundred MiB of it are reserved by the runtime;
``compile-check`` therefore also prints the free margin).

gcloud accelerator types and how they map onto chips:

- ``v4-N`` and ``v5p-N``: N counts TensorCores, 2 per chip (``v5p-128`` = 64 chips, ``v4-32`` = 16
  chips); 3-D torus slices ``2x2x1`` (one host of 4 chips) up to ``16x16x24``; 4 chips per host.
- ``v5litepod-N`` (also accepted as ``v5e-N``) and ``v6e-N``: N counts chips; 2-D slices ``1x1``,
  ``2x2``, ``2x4`` (one host) up to ``16x16``; hosts of 4 chips in multi-host slices.

The libtpu topology strings (found by experiment against libtpu 0.0.42): ``v4:2x2x4``, ``v5p:4x4x4``,
``v5e:4x4``, ``v6e:2x4``. For v4 the compile-only client must be asked for ``chip_config_name=
"megacore"`` (one JAX device per chip, as on a real v4 VM); single-host v5e/v6e slices of 1 or 8
chips need an explicit ``chips_per_host_bounds``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from w2s_jax.core.errors import UserError

GiB = 1 << 30


@dataclass(frozen=True)
class ChipSpec:
    name: str
    kind: str  # "tpu" | "gpu"
    hbm_bytes: int
    peak_bf16_flops: float  # dense, per chip
    hbm_bandwidth: float  # bytes/s
    chips_per_host: int = 4
    cores_per_chip: int = 1  # TensorCores counted by the gcloud accelerator-type number
    ndim: int = 2  # torus dimensions of a slice (TPU)
    device_kinds: tuple[str, ...] = field(default_factory=tuple)  # jax Device.device_kind spellings
    libtpu_name: str = ""  # platform prefix of the libtpu topology string

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / GiB


TPU_CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", "tpu", 32 * GiB, 275e12, 1200e9, 4, 2, 3, ("TPU v4",), "v4"),
    "v5e": ChipSpec("v5e", "tpu", 16 * GiB, 197e12, 819e9, 4, 1, 2, ("TPU v5 lite", "TPU v5e"), "v5e"),
    "v5p": ChipSpec("v5p", "tpu", 95 * GiB, 459e12, 2765e9, 4, 2, 3, ("TPU v5", "TPU v5p"), "v5p"),
    "v6e": ChipSpec("v6e", "tpu", 32 * GiB, 918e12, 1640e9, 4, 1, 2, ("TPU v6 lite", "TPU v6e"), "v6e"),
}

GPUS: dict[str, ChipSpec] = {
    "a100-80gb": ChipSpec("a100-80gb", "gpu", 80 * GiB, 312e12, 2039e9, 8, 1, 0, ("NVIDIA A100-SXM4-80GB",)),
    "h100-sxm": ChipSpec("h100-sxm", "gpu", 80 * GiB, 989e12, 3350e9, 8, 1, 0, ("NVIDIA H100 80GB HBM3",)),
    "h200": ChipSpec("h200", "gpu", 141 * GiB, 989e12, 4800e9, 8, 1, 0, ("NVIDIA H200",)),
}

ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "tpu v5 lite": "v5e", "a100": "a100-80gb", "h100": "h100-sxm"}


def chip(name: str) -> ChipSpec:
    """A chip by table name (``v5p``, ``h100-sxm``) or alias (``v5litepod``, ``h100``)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in TPU_CHIPS:
        return TPU_CHIPS[key]
    if key in GPUS:
        return GPUS[key]
    raise UserError(f"unknown accelerator `{name}`; known: {sorted(TPU_CHIPS) + sorted(GPUS)}")


def chip_for_device(device_kind: str) -> ChipSpec | None:
    """The table entry for a jax ``Device.device_kind`` string, or None (e.g. CPU)."""
    dk = device_kind.strip()
    for spec in list(TPU_CHIPS.values()) + list(GPUS.values()):
        if dk in spec.device_kinds:
            return spec
    low = dk.lower()
    for key, spec in (("h200", GPUS["h200"]), ("h100", GPUS["h100-sxm"]), ("a100", GPUS["a100-80gb"])):
        if key in low:
            return spec
    return None


# ----------------------------------------------------------------------------- slices


def _shape_3d(chips: int) -> tuple[int, ...]:
    """Default v4/v5p slice shape: from 2x2x1, double the smallest dimension (rightmost on ties)."""
    special = {6144: (16, 16, 24), 8960: (16, 20, 28)}
    if chips in special:
        return special[chips]
    if chips < 4 or chips & (chips - 1):
        raise ValueError(chips)
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        m = min(shape)
        i = max(j for j, s in enumerate(shape) if s == m)
        shape[i] *= 2
    return tuple(shape)


def _shape_2d(chips: int) -> tuple[int, ...]:
    """Default v5e/v6e slice shape: 1x1, 2x2, 2x4, 4x4, 4x8, ..., 16x16."""
    if chips == 1:
        return (1, 1)
    if chips < 4 or chips & (chips - 1) or chips > 256:
        raise ValueError(chips)
    a = 1 << (int(math.log2(chips)) // 2)
    return (a, chips // a)


@dataclass(frozen=True)
class Slice:
    """One TPU slice: chip type, torus shape, hosts."""

    chip: ChipSpec
    shape: tuple[int, ...]
    accelerator_type: str  # gcloud spelling

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        if self.chip.ndim == 2 and self.num_chips <= 8:
            return (self.shape[0], self.shape[1], 1)  # single-host slices: 1, 4 or 8 chips
        return (2, 2, 1)

    @property
    def chips_per_host(self) -> int:
        return math.prod(self.chips_per_host_bounds)

    @property
    def num_hosts(self) -> int:
        return max(1, self.num_chips // self.chips_per_host)

    @property
    def topology_name(self) -> str:
        """The string libtpu's ``get_topology_desc`` accepts, e.g. ``v5p:4x4x4``."""
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    def topology_kwargs(self) -> dict:
        kw: dict = {"chips_per_host_bounds": list(self.chips_per_host_bounds)}
        if self.chip.name == "v4":
            kw["chip_config_name"] = "megacore"
        return kw

    @property
    def hbm_bytes_total(self) -> int:
        return self.chip.hbm_bytes * self.num_chips

    @property
    def peak_flops_total(self) -> float:
        return self.chip.peak_bf16_flops * self.num_chips


def _gcloud_name(spec: ChipSpec, chips: int) -> str:
    prefix = "v5litepod" if spec.name == "v5e" else spec.name
    return f"{prefix}-{chips * spec.cores_per_chip}"


def parse_slice(name: str) -> Slice:
    """``v5p-128`` / ``v5litepod-16`` / ``v5e-16`` / ``v6e-8`` / ``v4-32`` or a topology ``v5p:4x4x4``."""
    s = name.strip().lower()
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)[:_ ]((\d+)(x\d+)+)", s)
    if m:
        spec = chip(m.group(1))
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if len(shape) != spec.ndim:
            raise UserError(f"topology `{name}`: {spec.name} slices have {spec.ndim} dimensions")
        return Slice(spec, shape, _gcloud_name(spec, math.prod(shape)))
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", s)
    if not m:
        raise UserError(
            f"unknown TPU accelerator type `{name}`; expected a gcloud name such as v5p-128, v5litepod-16, "
            "v6e-8, v4-32, or a topology such as v5p:4x4x4"
        )
    spec = chip(m.group(1))
    n = int(m.group(2))
    if n % spec.cores_per_chip:
        raise UserError(f"`{name}`: the number counts TensorCores ({spec.cores_per_chip} per {spec.name} chip)")
    chips = n // spec.cores_per_chip
    try:
        shape = _shape_3d(chips) if spec.ndim == 3 else _shape_2d(chips)
    except ValueError:
        raise UserError(f"`{name}` ({chips} chips) is not a standard {spec.name} slice; give a topology "
                        f"such as {spec.libtpu_name}:{'x'.join(['4'] * spec.ndim)}") from None
    return Slice(spec, shape, _gcloud_name(spec, chips))


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def libtpu_pin() -> str:
    """The libtpu requirement jax[tpu] names for the installed jax (e.g. ``libtpu==0.0.42.*``)."""
    try:
        from importlib.metadata import requires

        for req in requires("jax") or []:
            if req.startswith("libtpu") and "tpu" in req.split(";", 1)[-1]:
                return req.split(";", 1)[0].strip()
    except Exception:  # pragma: no cover - metadata missing
        pass
    return "libtpu"


def topology_devices(sl: Slice) -> list:
    """Compile-only devices for the slice (needs the ``libtpu`` package; no TPU needed)."""
    if not libtpu_available():
        raise UserError(f"compiling for a TPU topology needs libtpu (no TPU needed): pip install '{libtpu_pin()}'")
    import os

    # compile-only use: never take libtpu's single-process lock (another JAX process on this machine
    # may hold it), and do not query the GCE metadata server for a TPU that is not there
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    td = topologies.get_topology_desc(topology_name=sl.topology_name, platform="tpu", **sl.topology_kwargs())
    return list(td.devices)
