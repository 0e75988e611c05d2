"""spac_llamacpp.speculation.tracker."""
