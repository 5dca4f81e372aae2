"""megatron-s2d: the sparse-to-dense reward pipeline on megatron-core."""

from megatron_s2d.runtime.jit_hook import install as _install_jit_hook

_install_jit_hook()  # CPU only: megatron-core's torch.compile fuser off before it is bound (runtime/jit_hook.py)
