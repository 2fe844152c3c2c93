"""File formats: safetensors headers, base-model fingerprints, PEFT directories."""
