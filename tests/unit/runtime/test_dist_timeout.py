"""The collective timeout (runtime.dist.COLLECTIVE_TIMEOUT_S) reaches the job's world and every megatron group: a
rank that finishes its rollouts first waits in the next collective for the others, longer than torch's and megatron's
30-minute defaults allow. (device_id binding is CUDA-only: init_process_group's eager NCCL init.)"""

import datetime

from tests.distributed._launch import run_distributed


def _timeouts(rank, world):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_s2d.runtime.dist import init_distributed

    init_distributed(1, 1)
    groups = {"world": dist.group.WORLD, "dp": ps.get_data_parallel_group(), "tp": ps.get_tensor_model_parallel_group(),
              "pp": ps.get_pipeline_model_parallel_group(), "dp_gloo": ps.get_data_parallel_group_gloo()}
    return {k: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for k, g in groups.items()}


def test_world_and_megatron_groups_wait_two_hours():
    from megatron_s2d.runtime.dist import COLLECTIVE_TIMEOUT_S

    assert COLLECTIVE_TIMEOUT_S == datetime.timedelta(hours=2).total_seconds()
    out = run_distributed(_timeouts, world_size=1, init_process_group=False, timeout=120)[0]
    assert out == dict.fromkeys(("world", "dp", "tp", "pp", "dp_gloo"), COLLECTIVE_TIMEOUT_S), out
