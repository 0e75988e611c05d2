"""spac_llamacpp.base."""
