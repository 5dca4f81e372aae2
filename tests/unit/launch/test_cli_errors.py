"""``s2d``'s OS-error mapping: an OS error that is the state of the user's filesystem (read-only, a file where a
folder should be, a full disk) on a path the command was given is an exit-2 message naming the path; any other OS
error (a missing file we expected, a path nobody named) keeps its traceback: it may be our bug."""

import errno
import os

import pytest

from megatron_s2d.launch.cli import filesystem_error, parse_args


def _err(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def test_filesystem_errors_on_given_paths_are_named(tmp_path):
    args = parse_args(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")])
    msg = filesystem_error(args, _err(errno.EACCES, tmp_path / "run" / "stages" / "x" / "eval.json"))
    assert msg == f"{tmp_path}/run/stages/x/eval.json: Permission denied (not writable by you: fix its permissions, " \
                  "or use another path)"
    assert "read-only filesystem" in filesystem_error(args, _err(errno.EROFS, tmp_path / "rep" / "report.md"))
    assert "a file is there where a folder should be" in filesystem_error(args, _err(errno.EEXIST, tmp_path / "rep"))
    assert "disk is full" in filesystem_error(args, _err(errno.ENOSPC, tmp_path / "run" / "x"))


def test_other_os_errors_keep_their_traceback(tmp_path):
    args = parse_args(["report", str(tmp_path / "run")])
    assert filesystem_error(args, _err(errno.EACCES, "/etc/elsewhere")) is None  # not a path the command was given
    assert filesystem_error(args, _err(errno.ENOENT, tmp_path / "run" / "lineage.json")) is None  # may be ours
    assert filesystem_error(args, OSError(errno.EACCES, "no path")) is None


def test_the_run_folder_of_a_plan_counts_as_given(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: p\nrun_dir: /tmp/default-run\n")
    args = parse_args(["run", str(plan), f"run_dir={tmp_path / 'r'}"])
    assert filesystem_error(args, _err(errno.ENOTDIR, tmp_path / "r" / "LOCK")).startswith(f"{tmp_path}/r/LOCK: ")
    assert filesystem_error(args, _err(errno.ENOTDIR, "/tmp/default-run/LOCK")) is None  # overridden


@pytest.mark.parametrize("argv", [["status", "runs/x"], ["eval", "--model", "m", "--data", "d"]])
def test_commands_parse(argv):
    assert parse_args(argv).fn is not None
