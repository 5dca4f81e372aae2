import pytest

from megatron_s2d.launch.cli import parse_args


def test_overrides_before_and_after_options():
    a = parse_args(["run", "plan.yaml", "eval.k=4", "--stages", "opd,student_rl", "stages.opd.steps=2"])
    assert a.plan == "plan.yaml" and a.stages == "opd,student_rl"
    assert a.overrides == ["eval.k=4", "stages.opd.steps=2"]


def test_unknown_arguments_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["run", "plan.yaml", "--nope"])
    with pytest.raises(SystemExit):
        parse_args(["report", "runs/x", "eval.k=4"])
