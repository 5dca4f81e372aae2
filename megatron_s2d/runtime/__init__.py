"""Runtime: distributed init (nccl|gloo), CPU support for megatron-core, checkpoint io."""
