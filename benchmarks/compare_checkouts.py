"""`w2s bench` for two source checkouts, workload by workload, back to back on the same machine.

    python benchmarks/compare_checkouts.py OLD_DIR NEW_DIR [--only W1,W2] [--out F] [w2s bench options]

Each workload runs first in OLD_DIR then in NEW_DIR (each checkout's own `w2s bench`, with
``PYTHONPATH`` pointing at it), so a slow spell of a shared machine hits both sides of a pair rather
than one whole suite. The table gives each side's JAX tokens/s, their ratio (new / old) and the
PyTorch baseline measured in each run (its drift between the two runs is the machine's noise).
Make the old checkout with ``git worktree add /tmp/old COMMIT``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def compare(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """Rows paired in order (a workload may report several shapes under one name)."""
    out = []
    for o, n in zip(old_rows, new_rows):
        if o["workload"] != n["workload"]:
            raise SystemExit(f"the two checkouts report different rows: {o['workload']} / {n['workload']}")
        out.append({"workload": o["workload"], "old_jax_tok_s": o["jax_tok_s"], "new_jax_tok_s": n["jax_tok_s"],
                    "new_over_old": n["jax_tok_s"] / o["jax_tok_s"],
                    "old_baseline_tok_s": o.get("baseline_tok_s"), "new_baseline_tok_s": n.get("baseline_tok_s")})
    return out


def print_table(rows: list[dict]) -> None:
    print("| workload | old JAX tok/s | new JAX tok/s | new / old | PyTorch tok/s (old run, new run) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        base = ", ".join(f"{x:,.1f}" if x else "-" for x in (r["old_baseline_tok_s"], r["new_baseline_tok_s"]))
        print(f"| {r['workload']} | {r['old_jax_tok_s']:,.1f} | {r['new_jax_tok_s']:,.1f} | "
              f"{r['new_over_old']:.3f} | {base} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--only", default="sft,dpo,score,lora,generate")
    ap.add_argument("--out", type=Path, default=None, help="JSON with both sides' rows and the comparison")
    args, extra = ap.parse_known_args()  # anything else is passed on to `w2s bench` (e.g. --rounds 3)
    extra = [a for a in extra if a != "--"]
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.only.split(","):
            old = run_bench(args.old.resolve(), w, Path(tmp) / f"old_{w}.json", extra)
            new = run_bench(args.new.resolve(), w, Path(tmp) / f"new_{w}.json", extra)
            raw[w] = {"old": old["rows"], "new": new["rows"]}
            rows += compare(old["rows"], new["rows"])
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "raw": raw}, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
