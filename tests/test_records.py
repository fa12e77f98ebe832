"""Record files: errors name file and line; writes are atomic; appends survive kills."""
import json

import pytest

from reason.records import JsonlAppender, Problem, RecordError, read_jsonl, write_jsonl


def test_roundtrip(tmp_path):
    p = tmp_path / "p.jsonl"
    probs = [Problem(id=str(i), prompt=f"{i}+1?", ground_truth=str(i + 1)) for i in range(3)]
    assert write_jsonl(p, probs) == 3
    assert list(read_jsonl(p, Problem)) == probs


@pytest.mark.parametrize("line, msg", [
    ('{"id": "a", "prompt": "x"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "x"}', "field 'id'"),
    ('{"id": "a", "prompt": 3}', "field 'prompt"),
    ('{"id": "a", "prompt": "x", "bogus": 1}', "field 'bogus'"),
])
def test_bad_line_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "ok", "prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(RecordError) as e:
        list(read_jsonl(p, Problem))
    assert str(e.value).startswith(f"{p}:3: ") and msg in str(e.value)


def test_failed_write_leaves_old_file_untouched(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"a": 1}])

    def records():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(p, records())
    assert p.read_text() == '{"a": 1}\n'
    assert [f.name for f in tmp_path.iterdir()] == ["out.jsonl"]


def test_appender_trims_torn_tail(tmp_path):
    p = tmp_path / "traces.jsonl"
    p.write_text(json.dumps({"i": 0}) + "\n" + '{"i": 1, "tru')
    with JsonlAppender(p) as out:
        out.write({"i": 1})
    assert [r["i"] for r in read_jsonl(p)] == [0, 1]


@pytest.mark.parametrize("tail", ["", '{"i": 9, "tru', "x" * 200])
def test_whole_lines_length_reads_back_from_the_end_across_blocks(tmp_path, tail):
    from reason.records import _whole_lines_length

    p = tmp_path / "log.jsonl"
    whole = "".join(json.dumps({"i": i}) + "\n" for i in range(50))
    p.write_text(whole + tail)
    for block in (1, 7, 64, 1 << 16):  # a torn tail longer than the block makes it read back block by block
        assert _whole_lines_length(p, block) == len(whole)
    p.write_text("x" * 100)  # one torn line and no newline at all
    assert _whole_lines_length(p, 16) == 0
