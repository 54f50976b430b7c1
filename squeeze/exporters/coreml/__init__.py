"""Core ML export: ML programs holding squeeze's own codes (see `exporter`)."""

from squeeze.exporters.coreml.exporter import CoreMLExport, export_coreml, export_module

__all__ = ["CoreMLExport", "export_coreml", "export_module"]
