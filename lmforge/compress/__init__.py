"""Compression: weight-only quantization (`quant`, `gptq`, driven by `quantize`), knowledge
distillation (`distill`), pruning (`prune`) and GGUF export for llama.cpp (`gguf`)."""
