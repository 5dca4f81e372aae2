"""On a machine without CUDA, megatron-core's JIT fuser is switched off before megatron imports it.

megatron-core 0.16 sets ``megatron.core.jit.jit_fuser = torch.compile`` and decorates its fused kernels with it at
import time (``megatron/core/jit.py``; ``fusions/fused_bias_geglu.py`` and others use ``@jit_fuser``). The first
decoration imports ``torch._dynamo``: about 2 s of every process's start-up on this 2-core CPU (``import megatron.core``
5.1 s -> 3.1 s without it), and every stage job, evaluation and distributed test process pays it. On CPU none of those
kernels runs: our models build with ``bias_dropout_fusion``, ``bias_activation_fusion`` and ``apply_rope_fusion`` off
without Transformer Engine (``models/build.py``); were one called, it would run eagerly, the same arithmetic.

So, when ``megatron.core.jit`` is first imported and ``torch.cuda.is_available()`` is False, megatron's own
``disable_jit_fuser()`` runs right after that module executes, before any fused module binds ``jit_fuser``. GPU
processes are untouched. :func:`install` (from ``megatron_s2d/__init__.py``) imports nothing heavy; a process that
imported megatron-core before megatron_s2d keeps megatron's default. ``S2D_KEEP_JIT_FUSER=1`` keeps it too.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_TARGET = "megatron.core.jit"


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        import torch

        if not torch.cuda.is_available():
            module.disable_jit_fuser()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # once; find the real spec without this finder
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent; nothing when megatron's jit module is loaded already)."""
    if _TARGET in sys.modules or os.environ.get("S2D_KEEP_JIT_FUSER") == "1":
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
