"""TFLite / LiteRT export (`squeeze export --to tflite`); needs the `tflite` extra (litert-torch, ai-edge-litert)."""

from squeeze.exporters.tflite.exporter import TFLiteExport, export_module, export_tflite

__all__ = ["TFLiteExport", "export_module", "export_tflite"]
