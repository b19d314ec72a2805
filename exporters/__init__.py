"""compress's exporters, installed as `compress_exporters`: `onnx` writes an ONNX folder (needs torch),
`runtime` loads one with ONNX Runtime alone. Nothing is imported here, so the runtime stays torch-free."""
