"""On-disk quantized checkpoint formats."""
