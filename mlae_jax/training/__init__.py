"""Training: optimizer partition, sharded jitted steps, checkpoints, the run loop."""
