"""Whether two source checkouts compile the same programs: optimized HLO, source locations stripped.

    python benchmarks/compare_hlo.py OLD_DIR NEW_DIR [--preset tiny]

Each checkout compiles, in its own process (``PYTHONPATH`` pointing at it), the programs ``w2s
compile-check`` builds for the preset on one CPU device -- the SFT and DPO steps (remat ``full`` and
``none``) and the generation engine's prefill, insert and decode programs -- and the plain forward pass.
The optimized HLO text is hashed after dropping what names the source rather than the computation (the
file and function tables, ``metadata={...}``, stack-frame ids and the module name). Prints one line per
program and exits 1 when any differs. Both checkouts need the layered package (``w2s_jax.tools.check_targets``);
make the old one with ``git worktree add /tmp/old COMMIT``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def strip_hlo(text: str) -> str:
    """HLO text without source locations: the tables between the header and the first computation,
    ``metadata={...}``, ``stack_frame_id=`` and the module's name."""
    lines = text.splitlines()
    body = next((i for i, line in enumerate(lines) if line.startswith(("%", "ENTRY"))), len(lines))
    text = "\n".join(lines[:1] + lines[body:])
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r", stack_frame_id=\d+", "", text)
    return re.sub(r"^HloModule \S+", "HloModule m", text, flags=re.M)


def _digest(text: str) -> str:
    return hashlib.sha256(strip_hlo(text).encode()).hexdigest()[:16]


def compile_all(preset: str) -> dict[str, str]:
    """Digest of every program for ``preset`` in the checkout this process imports."""
    import jax
    import jax.numpy as jnp

    from w2s_jax.models import decoder
    from w2s_jax.models import params as MP
    from w2s_jax.models.config import get_preset
    from w2s_jax.parallel.sharding import make_mesh
    from w2s_jax.tools.check_config import CheckConfig
    from w2s_jax.tools.check_targets import build_targets
    from w2s_jax.train.config import TrainConfig

    out = {}
    mesh = make_mesh({"data": 1})
    for remat in ("full", "none"):
        cc = CheckConfig(model=preset, remat=remat, dtype="float32", sft=TrainConfig(batch_size=4, seq_len=128),
                         dpo=TrainConfig(batch_size=2, seq_len=128, loss_type="sigmoid"))
        for t in build_targets(cc, mesh, mesh):
            out[f"{t.name} (remat {remat})"] = _digest(t.fn.lower(*t.args).compile(t.compiler_options).as_text())
    cfg = get_preset(preset, dtype="float32")
    params = MP.init_params(cfg, jax.random.PRNGKey(0))
    fwd = jax.jit(lambda p, t: decoder.forward(p, t, cfg))
    out["forward"] = _digest(fwd.lower(params, jnp.zeros((2, 16), jnp.int32)).compile().as_text())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path, nargs="?")
    ap.add_argument("new", type=Path, nargs="?")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # inside one checkout: print the digests as JSON
        print(json.dumps(compile_all(args.preset)))
        return 0
    if args.old is None or args.new is None:
        ap.error("give OLD_DIR and NEW_DIR")
    sides = {}
    for name, tree in (("old", args.old.resolve()), ("new", args.new.resolve())):
        env = {**os.environ, "PYTHONPATH": str(tree)}
        p = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset], cwd=tree, env=env,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"compiling in {tree} failed:\n{p.stderr[-2000:]}")
        sides[name] = json.loads(p.stdout.strip().splitlines()[-1])
    differ = 0
    for key in sorted(set(sides["old"]) | set(sides["new"])):
        a, b = sides["old"].get(key), sides["new"].get(key)
        same = a == b
        differ += not same
        print(f"{'same     ' if same else 'DIFFERENT'} {key}: {a} {b}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
