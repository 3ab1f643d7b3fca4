"""The documentation is written for users: no file speaks about how the work on the project was
organised, and no Markdown link leaves the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BINARY = (".png", ".jpg", ".gguf", ".safetensors", ".ipynb")
PROCESS_WORDS = re.compile(
    r"\bsessions? [0-9]|\bthis session\b|\blease\b|\blent\b|device\s+notes|\bissue #?[0-9]", re.IGNORECASE
)


def _files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        paths = [REPO / p for p in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file under the root
        paths = [p for p in REPO.rglob("*") if ".git" not in p.parts]
    return [p for p in paths if p.is_file() and not p.name.endswith(BINARY)]


def test_no_text_about_how_the_work_was_organised():
    hits = []
    for p in _files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{p.relative_to(REPO)}: {m.group(0)!r}" for m in PROCESS_WORDS.finditer(text)]
    assert not hits, hits


def test_markdown_links_stay_inside_the_repository():
    bad = []
    for p in _files():
        if p.suffix != ".md":
            continue
        for m in re.finditer(r"\]\(([^)\s#]+)", p.read_text(encoding="utf-8")):
            link = m.group(1)
            if re.match(r"[a-z]+:", link):  # a web address
                continue
            target = (p.parent / link).resolve()
            if not target.is_relative_to(REPO):
                bad.append(f"{p.relative_to(REPO)}: {link}")
    assert not bad, bad
