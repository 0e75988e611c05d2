"""spac_llamacpp.sim."""
