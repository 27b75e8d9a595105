"""Torch-side tooling: ONNX export and artifact builders. Never needed at inference."""
