"""ONNX export: fp32/fp16 graphs, int8 QDQ, int4 MatMulNBits or blocked INT4 DequantizeLinear, with squeeze's integers.

    from squeeze.exporters.onnx import ONNXExport, export_onnx, export_module
"""

from squeeze.exporters.onnx.exporter import ONNXExport, export_module, export_onnx

__all__ = ["ONNXExport", "export_module", "export_onnx"]
