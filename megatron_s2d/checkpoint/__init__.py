"""Checkpoint formats and streaming I/O: megatron-s2d model checkpoints (megatron-core dist checkpoints + metadata),
training checkpoints, HF safetensors reading/writing, and the streaming HF <-> megatron conversions built on the
models' state-dict table (``models.state_dict``). The ``s2d convert`` CLI and numerical verify live in
``checkpoints_convert``, one layer up."""
