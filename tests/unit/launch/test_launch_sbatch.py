"""sbatch rendering through NeMo-Run's own template: resources, container, env, signal/requeue, dependencies, the
torchrun rendezvous on the first node, and the command each job runs."""

import re

import pytest

import io

from megatron_s2d.launch.experiment import launch_plan
from tests.unit.launch._plans import load, two_stage_plan, write_hf


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sbatch")
    hf = write_hf(tmp / "m")
    plan = load(tmp, two_stage_plan(tmp, hf, hf), [
        "launch.nodes=2", "launch.slurm.time=02:30:00", "launch.slurm.mem='500G'",
        "launch.slurm.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
        "launch.slurm.container_mounts=[/lustre:/lustre, /scratch:/scratch]",
        "launch.slurm.env={NCCL_DEBUG: WARN, PYTHONPATH: /lustre/code}", "launch.slurm.signal_seconds_before_end=420"])
    planned = launch_plan(plan, str(tmp / "run" / "plan.resolved.yaml"), executor="slurm", dry_run=True,
                          out=io.StringIO())
    return plan, planned, {name: open(path).read() for name, path in planned.scripts.items()}


def test_one_script_per_job(rendered):
    plan, planned, scripts = rendered
    assert sorted(scripts) == ["opd", "report", "teacher_rl"]
    assert all(p.endswith(f"dry_run/{n}.sbatch") for n, p in planned.scripts.items())


def test_stage_resources_and_environment(rendered):
    _, _, scripts = rendered
    s = scripts["opd"]
    for flag in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--partition=gpu", "--account=acct",
                 "--time=02:30:00", "--mem=500G", "--exclusive", "--signal=USR1@420", "--requeue",
                 "--kill-on-invalid-dep=yes", "--job-name=t-opd"):
        assert f"#SBATCH {flag}\n" in s, flag
    assert "#SBATCH --dependency='afterok:<teacher_rl>'" in s
    assert "export NCCL_DEBUG=WARN\n" in s and "export PYTHONPATH=/lustre/code\n" in s
    assert "--container-image nvcr.io/nvidia/pytorch:25.01-py3" in s
    assert re.search(r"--container-mounts /lustre:/lustre,/scratch:/scratch,\S+:/nemo_run", s)


def test_stage_command_is_torchrun_agent_with_rendezvous_on_first_node(rendered):
    plan, _, scripts = rendered
    cmd = re.search(r"python -m (.*)", scripts["opd"]).group(1)
    assert cmd == ("megatron_s2d.launch.agent --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "
                   "$head_node_ip:29500 --max-restarts 0 -m megatron_s2d.stages.entry --plan "
                   f"{plan.run_dir}/plan.resolved.yaml --stage opd")
    assert "head_node_ip=$(srun --nodes=1" in scripts["opd"]  # NeMo-Run's template resolves it


def test_first_stage_and_report(rendered):
    plan, _, scripts = rendered
    assert "--dependency" not in scripts["teacher_rl"].split("set -evx")[1]
    r = scripts["report"]
    assert "#SBATCH --dependency='afterok:<teacher_rl>:<opd>'" in r
    assert "#SBATCH --nodes=1\n" in r and "--gpus-per-node" not in r and "--signal" not in r
    assert f"python -m megatron_s2d.run.report_entry --run-dir {plan.run_dir}" in r


def test_job_interpreter_is_the_submitting_environments(tmp_path):
    """Without a container the job runs the interpreter that ran s2d (absolute: its venv), not `python` from the
    compute node's PATH, and the launcher checks that it imports megatron_s2d in the job's environment (from an empty
    working directory) before submitting; the profile can set another one; with an ssh tunnel it must."""
    import os
    import sys
    from pathlib import Path

    import megatron_s2d
    from megatron_s2d.errors import S2DError
    from megatron_s2d.launch.slurm import job_environment

    hf = write_hf(tmp_path / "m")
    plan = load(tmp_path, two_stage_plan(tmp_path, hf, hf))
    planned = launch_plan(plan, str(tmp_path / "run" / "plan.resolved.yaml"), executor="slurm", dry_run=True,
                          out=io.StringIO())
    script = open(planned.scripts["opd"]).read()
    assert f"{sys.executable} -m megatron_s2d.launch.agent" in script
    assert f"# interpreter: {sys.executable} (the interpreter running s2d" in script
    checkout = str(Path(megatron_s2d.__file__).resolve().parents[1])  # this environment's megatron_s2d
    interp, code, note = job_environment(plan)
    assert interp == sys.executable and code.startswith(checkout) and "interpreter running s2d" in note
    assert f"megatron-s2d code: {code}\n" in script

    no_s2d = tmp_path / "bin" / "python"  # an interpreter without megatron_s2d (the bug: the node's bare python)
    no_s2d.parent.mkdir()
    no_s2d.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'megatron_s2d'\" >&2\nexit 1\n")
    no_s2d.chmod(0o755)
    plan.launch.slurm.python = str(no_s2d)
    with pytest.raises(S2DError, match="cannot import megatron_s2d .*No module named 'megatron_s2d'.*would die"):
        job_environment(plan)
    plan.launch.slurm.python = str(tmp_path / "nowhere" / "python")
    with pytest.raises(S2DError, match="does not exist or is not executable"):
        job_environment(plan)
    plan.launch.slurm.python = "venv/bin/python"
    with pytest.raises(S2DError, match="must be an absolute path"):
        job_environment(plan)

    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if sys.prefix != sys.base_prefix and base.is_file():  # the venv's base interpreter: megatron_s2d via PYTHONPATH
        plan.launch.slurm.python = str(base)
        plan.launch.slurm.env = {"PYTHONPATH": f"{checkout}:$PYTHONPATH"}
        interp, code, note = job_environment(plan)
        assert (interp, note) == (str(base), "launch.slurm.python") and code.startswith(f"{checkout} (")
        plan.launch.slurm.env = {}
        if not os.environ.get("PYTHONPATH"):
            with pytest.raises(S2DError, match="No module named 'megatron_s2d'"):
                job_environment(plan)

    plan.launch.slurm.python = None
    plan.launch.slurm.container_image = "/images/s2d.sqsh"
    assert job_environment(plan)[0] == "python"  # the container's; nothing checked here
    plan.launch.slurm.container_image = None
    plan.launch.slurm.tunnel, plan.launch.slurm.host, plan.launch.slurm.user = "ssh", "login", "me"
    with pytest.raises(S2DError, match="launch.slurm.python is required with an ssh tunnel"):
        job_environment(plan)
    plan.launch.slurm.python = "/cluster/venvs/s2d/bin/python"  # a cluster path: not checked from here
    assert job_environment(plan)[:2] == ("/cluster/venvs/s2d/bin/python", "on the cluster (not checked from here)")
