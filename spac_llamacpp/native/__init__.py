"""spac_llamacpp.native.module."""
