"""``--overwrite`` never deletes the input or a folder that is not one of our exports (issue: `s2d convert
megatron-to-hf --out RUN/stages/teacher_rl --overwrite` used to wipe the stage folder it read from, exit 0)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints_convert import convert_hf_to_megatron, convert_megatron_to_hf, main
from megatron_s2d.checkpoint.model_ckpt import EXPORT_MARKER


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def stage_dir(converted, tmp_path):
    """A completed stage folder: checkpoints, COMPLETE, lineage and metrics, as a run writes them."""
    stage = tmp_path / "run" / "stages" / "teacher_rl"
    shutil.copytree(converted["llama"], stage / "checkpoints" / "step_000003")
    (stage / "checkpoints" / "step_000003" / EXPORT_MARKER).unlink()  # training checkpoints are not exports
    for name, text in (("COMPLETE", "done\n"), ("lineage.json", "{}\n"), ("metrics.jsonl", "{}\n")):
        (stage / name).write_text(text)
    return stage


def test_out_containing_the_input_is_refused(stage_dir, capsys):
    before = _tree(stage_dir)
    ckpt = stage_dir / "checkpoints" / "step_000003"
    for out in (stage_dir, ckpt, ckpt / "hf"):  # contains / is / is inside the input
        assert main(["megatron-to-hf", "--megatron", str(ckpt), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "destroy the input" in err and str(ckpt) in err
    assert _tree(stage_dir) == before


def test_overwrite_replaces_only_our_exports(converted, hf_models, tmp_path, capsys):
    ckpt = converted["llama"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["megatron-to-hf", "--megatron", str(ckpt), "--out", str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not a previous export" in err and str(mine) in err and EXPORT_MARKER in err
    assert (mine / "notes.txt").read_text() == "keep me"
    # the same for hf-to-megatron (it shares the publishing code)
    with pytest.raises(Exception, match="not a previous export"):
        convert_hf_to_megatron(hf_models["llama"], mine, overwrite=True)
    assert _tree(mine) == ["notes.txt"]
    # a previous export of ours is replaced
    release = tmp_path / "release"
    convert_megatron_to_hf(ckpt, release)
    assert (release / EXPORT_MARKER).is_file()
    convert_megatron_to_hf(ckpt, release, overwrite=True, dtype="bf16")
    assert (release / EXPORT_MARKER).is_file() and (release / "config.json").is_file()


def test_cli_refuses_the_stage_folder(stage_dir):
    """The issue's own command, through the installed console script: exit 2, nothing deleted."""
    before = _tree(stage_dir)
    s2d = Path(sys.executable).parent / "s2d"
    r = subprocess.run([str(s2d), "convert", "megatron-to-hf", "--megatron",
                        str(stage_dir / "checkpoints" / "step_000003"), "--out", str(stage_dir), "--overwrite"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "destroy the input" in r.stderr
    assert _tree(stage_dir) == before
