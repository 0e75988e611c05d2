"""spac_llamacpp.planning."""
