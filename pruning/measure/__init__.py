"""Measuring pruned models: ONNX export, latency (onnxruntime CPU, torch.compile GPU), report plots and tables."""
