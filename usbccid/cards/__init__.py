"""Where cards come from: one module per card source (``stored``, ``files``), ``registry``
picks one for a slot, ``store`` keeps cards and PIN counters in the state directory."""
