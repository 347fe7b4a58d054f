"""Compression stages: weight-only quantization (`gptq`, driven by `quantize`; the quantized
layer itself is `model.quant`), knowledge distillation (`distill`), pruning (`prune`) and GGUF
export for llama.cpp (`gguf`)."""
