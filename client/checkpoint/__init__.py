"""Model checkpoints: streaming writers, tensor encoders and checkpoint artifacts."""
