"""ONNX Runtime target (`.onnx` / `.ort`): lift-project layers in stock ONNX operators."""
