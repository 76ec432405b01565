"""Re-quantization of merged weights (numpy, CPU). `gguf_quants`: GGUF block types."""
