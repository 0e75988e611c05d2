"""spac_llamacpp.tiers."""
