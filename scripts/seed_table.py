"""Per-seed table (and mean, spread) from the results.json of several `w2s run` directories.

    python scripts/seed_table.py runs/seed0 runs/seed1 runs/seed2

Prints a Markdown table: test accuracy (%) of every model per run, the mean and the spread (max - min), PGR of
Stage I and Stage II, and checks of the targets the default config is meant to meet:
Stage I >= weak + 10 points, Stage I >= full weak FT + 15 points, Stage II >= Stage I - 3 points, PGR(Stage I) >= 0.3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _stage1(acc: dict) -> str:
    """The final Stage I model's row: round 2 if there is one, the hybrid-ft variant if there are several."""
    rows = [m for m in acc if m.startswith("Stage I ") or m == "Stage I"]
    rows.sort(key=lambda m: ("round 2" in m, "hybrid" in m))
    return rows[-1]


def checks(acc: dict, pgr: dict) -> dict[str, bool]:
    s1 = _stage1(acc)
    s2 = next(m for m in acc if m.startswith("Stage II"))
    a = {k: round(100 * v, 6) for k, v in acc.items()}  # accuracies are counts / n: no float noise at the limits
    return {
        "Stage I >= weak + 10": a[s1] >= a["weak"] + 10,
        "Stage I >= full weak FT + 15": a[s1] >= a["full weak FT"] + 15,
        "Stage II >= Stage I - 3": a[s2] >= a[s1] - 3,
        "PGR(Stage I) >= 0.3": round(pgr.get(s1) or 0, 6) >= 0.3,
    }


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    runs = []
    for d in argv:
        res = json.loads((Path(d) / "results.json").read_text())
        acc = {r["model"]: r["accuracy"] for r in res["models"]}
        pgr = {r["model"]: r.get("pgr") for r in res["models"]}
        seeds = res.get("seeds") or {}
        secs = {k: v for k, v in (res.get("seconds") or {}).items() if v is not None}
        cpu = {k: v for k, v in (res.get("cpu_seconds") or {}).items() if v is not None}
        runs.append({"dir": d, "acc": acc, "pgr": pgr, "seeds": seeds, "wall": sum(secs.values()),
                     "cpu": sum(cpu.values()) if cpu else None, "n": res["models"][0]["n"],
                     "checks": checks(acc, pgr)})
    models = list(runs[0]["acc"])
    head = ["model"] + [Path(r["dir"]).name for r in runs] + ["mean", "spread"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for m in models:
        vals = [100 * r["acc"][m] for r in runs if m in r["acc"]]
        cells = [f"{100 * r['acc'][m]:.1f}" if m in r["acc"] else "-" for r in runs]
        spread = max(vals) - min(vals)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {sum(vals) / len(vals):.1f} | {spread:.1f} |")
    for m in models:
        if m.startswith("Stage"):
            vals = [r["pgr"][m] for r in runs if r["pgr"].get(m) is not None]
            if vals:
                cells = [f"{r['pgr'][m]:.2f}" if r["pgr"].get(m) is not None else "-" for r in runs]
                lines.append(f"| PGR {m} | " + " | ".join(cells) +
                             f" | {sum(vals) / len(vals):.2f} | {max(vals) - min(vals):.2f} |")
    walls = [r["wall"] for r in runs]
    lines.append("| sum of stage wall times (s) | " + " | ".join(f"{w:.0f}" for w in walls) +
                 f" | {sum(walls) / len(walls):.0f} | {max(walls) - min(walls):.0f} |")
    if all(r["cpu"] is not None for r in runs):
        cpus = [r["cpu"] for r in runs]
        lines.append("| sum of stage CPU times (s) | " + " | ".join(f"{c:.0f}" for c in cpus) +
                     f" | {sum(cpus) / len(cpus):.0f} | {max(cpus) - min(cpus):.0f} |")
    for name in runs[0]["checks"]:
        lines.append(f"| {name} | " + " | ".join("yes" if r["checks"][name] else "**no**" for r in runs) + " | | |")
    print("\n".join(lines))
    keys = sorted({k for r in runs for k, v in r["seeds"].items() if v != runs[0]["seeds"].get(k)})
    if keys:
        print("\nseed keys that differ between runs: " + ", ".join(
            f"{k} = " + " / ".join(str(r["seeds"].get(k)) for r in runs) for k in keys))
    return 0 if all(all(r["checks"].values()) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
