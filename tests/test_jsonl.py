import json

import pytest

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import (
    JsonlAppender,
    check_unique_ids,
    read_done_ids,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_roundtrip_and_json_list(tmp_path):
    recs = [{"id": 1, "q": "é"}, {"id": 2, "q": "b"}]
    write_jsonl_atomic(tmp_path / "a" / "b.jsonl", recs)
    assert read_jsonl(tmp_path / "a" / "b.jsonl", required=("id", "q")) == recs
    write_json_atomic(tmp_path / "c.json", recs)
    assert read_jsonl(tmp_path / "c.json") == recs
    assert list(tmp_path.glob("**/*.tmp")) == []


def test_malformed_line_names_path_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1}\n\n{"id": 2\n')
    with pytest.raises(UserError, match=r"x\.jsonl:3: malformed"):
        read_jsonl(p)


def test_missing_field_and_non_object(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1, "q": 1}\n{"id": 2}\n')
    with pytest.raises(UserError, match=r"x\.jsonl:2: .*`q`"):
        read_jsonl(p, required=("id", "q"))
    p.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"x\.jsonl:2: expected a JSON object"):
        read_jsonl(p)


def test_empty_file(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        read_jsonl(p)
    assert read_jsonl(p, allow_empty=True) == []
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"id": "old"}\n')

    def gen():
        yield {"id": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(p, gen())
    assert p.read_text() == '{"id": "old"}\n'
    assert [f.name for f in tmp_path.iterdir()] == ["out.jsonl"]


def test_appender_and_resume_truncates_partial_tail(tmp_path):
    p = tmp_path / "gen.jsonl"
    with JsonlAppender(p) as app:
        app.write({"id": 0, "r": "a"})
        app.write({"id": 1, "r": "b"})
    with p.open("a") as f:
        f.write('{"id": 2, "r": "c')  # killed mid-write
    assert read_done_ids(p) == {0, 1}
    assert p.read_text().endswith('"b"}\n')
    with JsonlAppender(p) as app:
        app.write({"id": 2, "r": "c"})
    assert [r["id"] for r in read_jsonl(p)] == [0, 1, 2]
    assert read_done_ids(tmp_path / "none.jsonl") == set()


def test_complete_tail_without_newline_is_kept(tmp_path):
    p = tmp_path / "gen.jsonl"
    p.write_text('{"id": 0}\n{"id": 1}')
    assert read_done_ids(p) == {0, 1}
    with JsonlAppender(p) as app:
        app.write({"id": 2})
    assert [r["id"] for r in read_jsonl(p)] == [0, 1, 2]


def test_resume_errors_on_corruption_in_the_middle(tmp_path):
    p = tmp_path / "gen.jsonl"
    p.write_text('{"id": 0}\n{"id": 1\n{"id": 2}\n')
    with pytest.raises(UserError, match=r"gen\.jsonl:2"):
        read_done_ids(p)


def test_check_unique_ids(tmp_path):
    check_unique_ids([{"id": 1}, {"id": 2}], "f.jsonl")
    with pytest.raises(UserError, match=r"f\.jsonl: duplicate id 'a'"):
        check_unique_ids([{"id": "a"}, {"id": "b"}, {"id": "a"}], "f.jsonl")


def test_json_file_errors(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"a": 1}))
    with pytest.raises(UserError, match="expected a JSON list"):
        read_jsonl(p)
    p.write_text("[1]")
    with pytest.raises(UserError, match=r"x\.json\[0\]"):
        read_jsonl(p)
