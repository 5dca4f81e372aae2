"""Trainable policy and frozen scorer on megatron-core: vocab-parallel log-probs, train step, optimizer."""
