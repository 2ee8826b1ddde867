"""Training with Lightning and TorchRec: sharding plan, DMP strategy, fused optimizers, sharded checkpoints."""
