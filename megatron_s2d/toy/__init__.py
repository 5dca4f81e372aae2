"""The toy world: a shipped synthetic arithmetic data set, a tiny local tokenizer, and tiny pre-trained Qwen3 /
Llama-architecture base teacher and student models, so the whole pipeline runs on a CPU in minutes.

Names are re-exported lazily, so `python -m megatron_s2d.toy.build` does not import its own module twice.
"""

import importlib

_EXPORTS = {
    "ToyBuildConfig": "megatron_s2d.toy.build",
    "ToyWorld": "megatron_s2d.toy.build",
    "build_toy_world": "megatron_s2d.toy.build",
    "load_toy_world": "megatron_s2d.toy.build",
    "generate": "megatron_s2d.toy.problems",
    "generate_splits": "megatron_s2d.toy.problems",
    "load_shipped": "megatron_s2d.toy.problems",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_s2d.toy' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
