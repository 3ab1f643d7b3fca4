"""The `w2s` command: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``main(argv: list[str]) -> int``; the module is
imported only when its command runs, so `w2s grade` never pays for importing JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import glob
import importlib
import importlib.util
import io
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from w2s_jax import __version__
from w2s_jax.core.errors import UserError
from w2s_jax.core.hostmem import tune_host_malloc
from w2s_jax.core.paths import check_output_not_input
from w2s_jax.parallel import distributed

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("w2s_jax.cli.run", "run the weak-to-strong pipeline from a config"),
    "data": ("w2s_jax.cli.data", "build data sets: split, full-weak, consistency, vote, pairs"),
    "grade": ("w2s_jax.cli.grade", "extract and grade answers in a JSONL file"),
    "generate": ("w2s_jax.cli.generate", "batched generation with a KV cache"),
    "logprobs": ("w2s_jax.cli.logprobs", "summed completion log-probabilities"),
    "convert": ("w2s_jax.cli.convert", "convert checkpoints between HF/GGUF and w2s-jax"),
    "sft": ("w2s_jax.cli.train", "supervised fine-tuning"),
    "dpo": ("w2s_jax.cli.train", "preference optimization (DPO, IPO, hinge, ORPO, SimPO)"),
    "compile-check": ("w2s_jax.cli.compile_check", "ahead-of-time fit check for a TPU topology"),
    "bench": ("w2s_jax.cli.bench", "benchmarks against PyTorch baselines"),
}


# OSErrors that mean a problem with the user's disk or paths rather than a bug
_ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EISDIR", "EEXIST",
                                "ENOENT", "ENAMETOOLONG", "EMFILE") if hasattr(errno, n)
)

# commands that run one JAX program across all hosts of a multi-host slice
MULTIHOST_COMMANDS = ("run", "generate", "logprobs", "sft", "dpo")


def _compile_cache_defaults() -> None:
    """Persist XLA compilations across processes and stages (``W2S_COMPILE_CACHE=off`` disables).

    Every stage of `w2s run` compiles the same programs for models of the same shape; the cache turns
    those into lookups. Set before JAX is imported, through JAX's own environment variables.
    """
    where = os.environ.get("W2S_COMPILE_CACHE", str(Path.home() / ".cache" / "w2s" / "xla"))
    if where.lower() in ("off", "0", "none", ""):
        return
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", where)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def _tpu_chips_present() -> bool:
    """Whether this machine has TPU chips (Google PCI devices, as JAX itself checks)."""
    for f in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(f) as fh:
                if fh.read().strip() == "0x1ae0":
                    return True
        except OSError:
            continue
    return False


def _platform_defaults(command: str) -> None:
    """Keep JAX away from libtpu on a machine without TPU chips.

    With libtpu installed (the ``[test]`` extra installs it for compile-only TPU topologies), JAX loads
    and initialises its TPU plugin on every start, which costs about a second and on some machines
    prints an ``E0000 ... INVALID_ARGUMENT`` block. Unless ``JAX_PLATFORMS`` is set, or the command
    asks for a TPU topology (``compile-check``), the platforms are then the GPU ones whose plugins are
    installed (skipped by JAX when no GPU is visible) and the CPU."""
    if "JAX_PLATFORMS" in os.environ or command == "compile-check":
        return
    if importlib.util.find_spec("libtpu") is None or _tpu_chips_present():
        return
    platforms = []
    try:
        names = [ep.name for ep in entry_points(group="jax_plugins")]
    except Exception:  # noqa: BLE001 -- metadata of a broken install: CPU only
        names = []
    for mod in ("jax_cuda12_plugin", "jax_cuda13_plugin"):
        try:
            if importlib.util.find_spec(mod) is not None:
                names.append(mod)
        except (ImportError, ValueError):
            pass
    if any("cuda" in n for n in names):
        platforms.append("cuda")
    if any("rocm" in n for n in names) and os.path.exists("/dev/kfd"):
        platforms.append("rocm")
    os.environ["JAX_PLATFORMS"] = ",".join([*platforms, "cpu"])


# commands that take an input and an output file and do not check them themselves (the others do:
# generate, logprobs, data, convert): input flags, output flags
_OUTPUT_GUARDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {"grade": (("--input",), ("--output",))}


def _guard_outputs(name: str, args: list[str]) -> None:
    """Refuse an output that is one of the inputs (same path or same file) before the command runs."""
    spec = _OUTPUT_GUARDS.get(name)
    if spec is None or any(a in ("-h", "--help") for a in args):
        return
    ap = argparse.ArgumentParser(add_help=False)
    for flag in (*spec[0], *spec[1]):
        ap.add_argument(flag)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ns, _ = ap.parse_known_args(args)
    except SystemExit:  # malformed: the command's own parser reports it
        return
    get = lambda f: getattr(ns, f[2:].replace("-", "_"))  # noqa: E731
    check_output_not_input({f: get(f) for f in spec[1]}, {f: get(f) for f in spec[0]})


def _usage() -> str:
    lines = ["usage: w2s COMMAND [options]", "", "commands:"]
    width = max(len(c) for c in COMMANDS)
    for name, (_, desc) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {desc}")
    lines.append("")
    lines.append("Run `w2s COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        print(f"w2s: unknown command `{name}`{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    _compile_cache_defaults()
    _platform_defaults(name)
    tune_host_malloc()  # before JAX/torch start their threads (see w2s_jax/core/hostmem.py)
    module = importlib.import_module(COMMANDS[name][0])
    if name in MULTIHOST_COMMANDS and not any(a in ("-h", "--help") for a in argv[1:]):
        distributed.initialize()  # joins a multi-host run (TPU pod, W2S_COORDINATOR, ...); else does nothing
    try:
        _guard_outputs(name, argv[1:])
        return int(module.main(argv[1:], prog=f"w2s {name}", command=name) or 0)
    except UserError as e:
        print(f"w2s {name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # the machine's side of a user error: disk full, read-only file system, no permission, a path
        # component that is a file. One line naming the path; anything else stays a traceback (a bug).
        line = _environment_error(e)
        if line is None:
            raise
        print(f"w2s {name}: error: {line}", file=sys.stderr)
        return 2


# what libraries that do their own I/O (Orbax/TensorStore, safetensors) say for the same conditions
_ENVIRONMENT_MESSAGES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                         "Permission denied")


def _environment_error(e: BaseException) -> str | None:
    """One line for an exception caused by the disk or a path (an OSError with one of the errnos
    above anywhere in its chain, or a library error quoting one), else None."""
    seen = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _ENVIRONMENT_ERRNOS:
            return f"{x.filename or 'output'}: {x.strerror or x}"
        x = x.__cause__ or x.__context__
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    if any(m in first for m in _ENVIRONMENT_MESSAGES):
        return first if len(first) <= 300 else first[:297] + "..."
    return None


if __name__ == "__main__":
    sys.exit(main())
