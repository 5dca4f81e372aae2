"""On CPU, megatron-core's torch.compile fuser is off before megatron binds it (runtime/jit_hook.py): its fused
kernels are plain functions and torch._dynamo is never imported (about 2 s of every process's start-up)."""

import os
import subprocess
import sys

import pytest
import torch

PROBE = ("import sys, megatron_s2d, megatron.core.models.gpt, megatron.core.jit as j, "
         "megatron.core.fusions.fused_bias_geglu as g; "
         "print(j.jit_fuser.__name__, g.bias_geglu.__class__.__name__, 'torch._dynamo' in sys.modules)")


def _probe(**env) -> list[str]:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True)
    return out.stdout.split()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the hook acts on CPU-only machines")
def test_cpu_processes_import_megatron_without_its_compile_fuser():
    assert _probe() == ["noop_decorator", "function", "False"]
