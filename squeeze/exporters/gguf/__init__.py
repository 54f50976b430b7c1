"""GGUF (llama.cpp) export: block codecs for ggml tensor types."""
