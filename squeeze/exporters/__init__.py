"""Exporters that write quantized models to deployment formats."""
