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
    compute node's PATH; the profile can set one; with an ssh tunnel it must (the local one is not on the cluster)."""
    import sys

    from megatron_s2d.errors import S2DError
    from megatron_s2d.launch.slurm import job_environment

    hf = write_hf(tmp_path / "m")
    plan = load(tmp_path, two_stage_plan(tmp_path, hf, hf))
    planned = launch_plan(plan, str(tmp_path / "run" / "plan.resolved.yaml"), executor="slurm", dry_run=True,
                          out=io.StringIO())
    script = open(planned.scripts["opd"]).read()
    assert f"{sys.executable} -m megatron_s2d.launch.agent" in script
    assert f"# interpreter: {sys.executable} (the interpreter running s2d" in script
    plan.launch.slurm.python = "/opt/venvs/s2d/bin/python"
    assert job_environment(plan)[0] == "/opt/venvs/s2d/bin/python"
    plan.launch.slurm.python = "venv/bin/python"
    with pytest.raises(S2DError, match="must be an absolute path"):
        job_environment(plan)
    plan.launch.slurm.python = None
    plan.launch.slurm.tunnel, plan.launch.slurm.host, plan.launch.slurm.user = "ssh", "login", "me"
    with pytest.raises(S2DError, match="launch.slurm.python is required with an ssh tunnel"):
        job_environment(plan)
