"""ONNX export: fp32/fp16 graphs, int8 QDQ and int4 MatMulNBits carrying squeeze's own integers.

    from squeeze.exporters.onnx import ONNXExport, export_onnx, export_module
"""

from squeeze.exporters.onnx.exporter import ONNXExport, export_module, export_onnx

__all__ = ["ONNXExport", "export_module", "export_onnx"]
