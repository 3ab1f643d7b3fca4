"""What ``w2s compile-check`` reports: per-stage memory, FLOPs and times per chip, and the table it prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class StageReport:
    stage: str
    ok: bool = True
    error: str | None = None
    arguments: int = 0  # bytes per chip
    outputs: int = 0
    aliased: int = 0  # donated arguments reused for outputs
    temporaries: int = 0
    code: int = 0
    total: int = 0  # arguments + outputs - aliased + temporaries + code
    hbm: int = 0
    fits: bool = False
    flops_compiled: float | None = None  # per chip, from cost_analysis (loops counted once by XLA)
    flops_analytic: float = 0.0  # per chip
    bytes_accessed: float | None = None  # per chip, from cost_analysis
    tokens: int = 0  # global tokens processed per step
    time_50: float = 0.0  # seconds at 50% of peak bf16 FLOP/s (analytic FLOPs)
    time_hbm: float | None = None  # seconds to move the accessed bytes at HBM bandwidth
    compile_s: float = 0.0
    detail: str = ""


@dataclass
class Report:
    topology: str
    accelerator_type: str
    chip: str
    num_chips: int
    num_hosts: int
    hbm_per_chip: int
    peak_flops_per_chip: float
    mesh: dict
    model: str
    num_params: int
    stages: list[StageReport]

    @property
    def fits(self) -> bool:
        return all(s.ok and s.fits for s in self.stages)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fits"] = self.fits
        return d


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / (1 << 30):.2f}"


def _secs(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def _flops(f: float | None) -> str:
    return "-" if f is None else f"{f:.3g}"


def format_report(r: Report) -> str:
    head = (
        f"{r.model} ({r.num_params / 1e9:.2f}B params) on {r.accelerator_type} = {r.topology}: {r.num_chips} chips "
        f"({r.chip}, {r.hbm_per_chip / (1 << 30):.0f} GiB HBM, {r.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16), "
        f"{r.num_hosts} hosts; mesh {r.mesh}"
    )
    cols = ["stage", "args GiB", "out GiB", "alias GiB", "temp GiB", "total GiB", "HBM GiB", "fits",
            "FLOPs/chip (XLA)", "FLOPs/chip (model)", "t @50% peak", "t @HBM BW", "compile"]
    rows = []
    for s in r.stages:
        if not s.ok:
            rows.append([s.stage, "error", "", "", "", "", _gib(s.hbm), "NO", "", "", "", "", f"{s.compile_s:.0f} s"])
            continue
        rows.append([
            s.stage, _gib(s.arguments), _gib(s.outputs), _gib(s.aliased), _gib(s.temporaries), _gib(s.total),
            _gib(s.hbm), "yes" if s.fits else "NO", _flops(s.flops_compiled), _flops(s.flops_analytic),
            _secs(s.time_50), _secs(s.time_hbm), f"{s.compile_s:.0f} s",
        ])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    notes = [f"- {s.stage}: {s.detail}" for s in r.stages if s.detail]
    errors = [f"- {s.stage}: ERROR {s.error}" for s in r.stages if not s.ok]
    if notes or errors:
        lines += [""] + notes + errors
    lines.append("")
    lines.append("FITS" if r.fits else "DOES NOT FIT")
    return "\n".join(lines)


__all__ = ["Report", "StageReport", "format_report"]
