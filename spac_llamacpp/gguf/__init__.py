"""spac_llamacpp.gguf."""
