"""core.programs.ProgramCache: lookups, building on a miss, oldest-first eviction."""

import pytest

from w2s_jax.core.programs import ProgramCache


def test_get_or_make_builds_once_and_evicts_the_oldest():
    made = []

    def make(k):
        made.append(k)
        return f"program {k}"

    c = ProgramCache(max_entries=2)
    assert c.get_or_make("a", lambda: make("a")) == "program a"
    assert c.get_or_make("a", lambda: make("a")) == "program a"
    assert made == ["a"]
    c.get_or_make("b", lambda: make("b"))
    c.get_or_make("c", lambda: make("c"))  # full: "a" goes
    assert "a" not in c and "b" in c and "c" in c and len(c) == 2
    assert c.get("a") is None and c.get("a", 0) == 0
    c.put("b", "again")  # replacing an entry evicts nothing
    assert len(c) == 2 and c.get("b") == "again" and "c" in c
    c.clear()
    assert len(c) == 0
    with pytest.raises(ValueError):
        ProgramCache(max_entries=0)
