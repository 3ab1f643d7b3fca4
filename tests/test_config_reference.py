"""docs/configs.md lists every config key with its type and default: generated from the dataclasses
by scripts/config_reference.py, and checked here so that it cannot drift from the code."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configs_md_matches_the_dataclasses():
    ref = _script()
    _, block, _ = ref.split_doc((REPO / "docs" / "configs.md").read_text(encoding="utf-8"))
    assert block == ref.render(), "docs/configs.md is out of date: run python scripts/config_reference.py --write"


def test_every_key_is_listed_and_every_description_names_a_key():
    ref = _script()
    text = ref.render()
    classes = {}
    for _, root in ref.roots():
        todo = [root]
        while todo:
            cls = todo.pop()
            if cls.__name__ in classes:
                continue
            classes[cls.__name__] = cls
            for f in dataclasses.fields(cls):
                assert f"| `{f.name}` |" in text, f"{cls.__name__}.{f.name} missing"
                todo += ref._dataclasses_in(ref.typing.get_type_hints(cls)[f.name])
    for cls_name, key in ref.DESCRIPTIONS:
        assert cls_name in classes and key in {f.name for f in dataclasses.fields(classes[cls_name])}, (cls_name, key)
