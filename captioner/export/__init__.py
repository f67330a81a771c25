"""Export: a checkpoint as a self-describing ONNX folder (`onnx`), optionally int8 (`quantization`), which
`captioner.inference.exported` captions with, torch-free."""

from captioner.export.onnx import export_command, export_onnx

__all__ = ["export_command", "export_onnx"]
