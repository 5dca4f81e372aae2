"""The one reader of run-folder JSON: a damaged file is an S2DError naming the file and where it breaks (never a
bare JSONDecodeError traceback), OS errors pass through with their path."""

import pytest

from megatron_s2d.errors import S2DError, read_json, read_jsonl


def test_damaged_json_names_the_file_the_place_and_the_fix(tmp_path):
    p = tmp_path / "lineage.json"
    p.write_text('{"stage": "opd", "ledger": {"labels_con')
    with pytest.raises(S2DError, match=rf"^{p}: damaged JSON \(Unterminated string starting at: line 1 column 29 \(char 28\)\): fix me$"):
        read_json(p, "fix me")
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(S2DError, match=rf"^{p}: damaged JSON \(not UTF-8 text at byte 7\)"):
        read_json(p)
    p.write_text('{"a": [1, 2]}')
    assert read_json(p) == {"a": [1, 2]}


def test_damaged_jsonl_names_the_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "re\n')
    with pytest.raises(S2DError, match=rf"^{p}: damaged JSON at line 4 \(Unterminated string starting at: column 13\)"):
        read_jsonl(p)
    p.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]


def test_os_errors_pass_through_with_their_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_json(tmp_path / "missing.json")
    assert e.value.filename == str(tmp_path / "missing.json")
    with pytest.raises(IsADirectoryError):
        read_jsonl(tmp_path)
