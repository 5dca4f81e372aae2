"""Run megatron-core on CPU (gloo), for laptops and CI.

megatron-core 0.16 assumes CUDA in a handful of places. On a machine with *no* CUDA device we redirect them,
all in this one module (see shared/ENVIRONMENT.md for how each was found):

1. ``torch.cuda.current_device()`` (RoPE frequency move, buffer allocation) -> returns the string ``"cpu"``.
2. Tensors created with a literal ``device="cuda"`` (the default causal mask, some buffers) and ``.cuda()`` calls:
   a :class:`torch.overrides.TorchFunctionMode` rewrites any cuda device argument to cpu.
3. ``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` grads; the replacement
   below is the same arithmetic (scale every grad by max_norm / (total_norm + 1e-6) when that is < 1) without it.
4. The CUDA RNG tracker: ``torch.cuda.{get,set}_rng_state`` / ``manual_seed`` and megatron's
   ``tensor_parallel.random._{get,set}_cuda_rng_state`` are mapped to the CPU generator, so
   ``model_parallel_cuda_manual_seed`` and the tracker's ``fork()`` work (forks become CPU-generator forks).

``enable()`` is a no-op (returns False) when CUDA is available: the shim must never activate on a GPU machine.
It is idempotent and process-global; it is entered by :func:`megatron_s2d.runtime.dist.init_distributed`.
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_LOCK = threading.Lock()
_ACTIVE_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, int):  # torch treats a bare int as a cuda ordinal
        return True
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda`` keyword arguments and ``.cuda()``/``.to('cuda')`` calls to cpu."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda(device=None, non_blocking=False)
            return args[0]
        if name == "to" and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a) and not isinstance(a, int)) else a
                         for i, a in enumerate(args))
        if name in ("pin_memory",):
            return args[0]
        return func(*args, **kwargs)


def _cpu_rng_state(device=None):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        with torch.no_grad():
            for g in grads:
                g.mul_(clip_coeff)


def enable() -> bool:
    """Activate the CPU redirections if (and only if) no CUDA device exists. Returns True if active."""
    global _ACTIVE_MODE
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _ACTIVE_MODE is not None:
            return True
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
        torch.cuda.get_rng_state = _cpu_rng_state  # type: ignore[assignment]
        torch.cuda.set_rng_state = _set_cpu_rng_state  # type: ignore[assignment]
        torch.cuda.manual_seed = lambda seed: None  # the CPU generator is seeded by torch.manual_seed
        torch.cuda.manual_seed_all = lambda seed: None
        torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
        torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]

        from megatron.core.tensor_parallel import random as mrandom

        mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
            torch.get_rng_state().clone() if clone else torch.get_rng_state()
        )
        mrandom._set_cuda_rng_state = _set_cpu_rng_state
        from megatron.core.optimizer import clip_grads, optimizer as moptimizer

        clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
        moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
        _ACTIVE_MODE = _CudaToCpuMode()
        _ACTIVE_MODE.__enter__()
        return True
