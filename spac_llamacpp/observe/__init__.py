"""spac_llamacpp.observe."""
