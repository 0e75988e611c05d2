"""spac_llamacpp.tools."""
