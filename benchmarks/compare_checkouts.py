"""`w2s bench` for two source checkouts, workload by workload, back to back on the same machine.

    python benchmarks/compare_checkouts.py OLD_DIR NEW_DIR [--only W1,W2] [--repeats N] [--out F]
        [w2s bench options]

Each workload runs first in OLD_DIR then in NEW_DIR (each checkout's own `w2s bench`, with
``PYTHONPATH`` pointing at it), so a slow spell of a shared machine hits both sides of a pair rather
than one whole suite. ``--repeats N`` runs each pair N times, alternating old, new, new, old, ...,
and compares the medians of each side. The table gives each side's JAX tokens/s, their ratio (new / old) and the
PyTorch baseline measured in each run (its drift between the two runs is the machine's noise).
Make the old checkout with ``git worktree add /tmp/old COMMIT``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_bench(tree: Path, workload: str, out: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "w2s_jax.cli", "bench", "--only", workload, "--out", str(out), *extra]
    print(f"[compare] {tree}: {' '.join(cmd[1:])}", flush=True)
    p = subprocess.run(cmd, cwd=tree, env=env)
    if p.returncode != 0 or not out.exists():
        raise SystemExit(f"`w2s bench --only {workload}` failed in {tree} (exit {p.returncode})")
    return json.loads(out.read_text())


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Row-wise medians of the JAX and PyTorch tokens/s over several runs of one workload."""
    out = []
    for rows in zip(*runs):
        r = dict(rows[0])
        for key in ("jax_tok_s", "baseline_tok_s"):
            vals = sorted(x[key] for x in rows if x.get(key))
            r[key] = statistics.median(vals) if vals else None
        r["runs"] = [x["jax_tok_s"] for x in rows]
        out.append(r)
    return out


def compare(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """Rows paired in order (a workload may report several shapes under one name)."""
    out = []
    for o, n in zip(old_rows, new_rows):
        if o["workload"] != n["workload"]:
            raise SystemExit(f"the two checkouts report different rows: {o['workload']} / {n['workload']}")
        out.append({"workload": o["workload"], "old_jax_tok_s": o["jax_tok_s"], "new_jax_tok_s": n["jax_tok_s"],
                    "new_over_old": n["jax_tok_s"] / o["jax_tok_s"],
                    "old_baseline_tok_s": o.get("baseline_tok_s"), "new_baseline_tok_s": n.get("baseline_tok_s"),
                    "old_runs": o.get("runs"), "new_runs": n.get("runs")})
    return out


def print_table(rows: list[dict]) -> None:
    print("| workload | old JAX tok/s | new JAX tok/s | new / old | PyTorch tok/s (old run, new run) "
          "| runs (old; new) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        base = ", ".join(f"{x:,.1f}" if x else "-" for x in (r["old_baseline_tok_s"], r["new_baseline_tok_s"]))
        each = "; ".join(", ".join(f"{x:,.1f}" for x in r[k] or ()) for k in ("old_runs", "new_runs"))
        print(f"| {r['workload']} | {r['old_jax_tok_s']:,.1f} | {r['new_jax_tok_s']:,.1f} | "
              f"{r['new_over_old']:.3f} | {base} | {each} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--only", default="sft,dpo,score,lora,generate")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternating; medians are compared")
    ap.add_argument("--out", type=Path, default=None, help="JSON with both sides' rows and the comparison")
    args, extra = ap.parse_known_args()  # anything else is passed on to `w2s bench` (e.g. --rounds 3)
    extra = [a for a in extra if a != "--"]
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.only.split(","):
            runs: dict[str, list] = {"old": [], "new": []}
            for i in range(args.repeats):
                order = ("old", "new") if i % 2 == 0 else ("new", "old")
                for side in order:
                    tree = (args.old if side == "old" else args.new).resolve()
                    runs[side].append(run_bench(tree, w, Path(tmp) / f"{side}_{w}_{i}.json", extra)["rows"])
            raw[w] = runs
            rows += compare(median_rows(runs["old"]), median_rows(runs["new"]))
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "raw": raw}, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
