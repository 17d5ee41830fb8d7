"""onnx-gpfq: GPFQ post-training quantization for ONNX models."""
