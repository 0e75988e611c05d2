"""spac_llamacpp.models."""
