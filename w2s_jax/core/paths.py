"""Output-path guards shared by every command: an output never overwrites or grows one of the inputs.

Two paths are the same file when they resolve to the same path (symbolic links followed) or, when
both exist, name the same inode (a hard link to the input is the input).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from w2s_jax.core.errors import UserError

__all__ = ["same_file", "check_output_not_input", "check_output_file"]


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        if pa.resolve() == pb.resolve():
            return True
    except OSError:
        pass
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (str, os.PathLike)):
        return [v]
    return [x for x in v if x is not None]


def check_output_not_input(
    outputs: Mapping[str, str | os.PathLike | Iterable | None],
    inputs: Mapping[str, str | os.PathLike | Iterable | None],
) -> None:
    """Raise a UserError when an output (``{flag: path or paths}``) is one of the inputs."""
    for oflag, ov in outputs.items():
        for o in _as_list(ov):
            for iflag, iv in inputs.items():
                for i in _as_list(iv):
                    if same_file(o, i):
                        raise UserError(
                            f"{oflag} {o} is the same file as {iflag} {i}; writing it would destroy the input "
                            "(choose another output path)"
                        )


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> None:
    """An output file path must not be a directory, and no parent of it may be a file."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a directory, expected a file path")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {p}: its parent {parent} is a file, not a directory")
            break
