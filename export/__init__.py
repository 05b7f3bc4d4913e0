"""valign outside PyTorch: the model as ONNX graphs, run by onnxruntime (`valign export`, `--runtime onnx`)."""
