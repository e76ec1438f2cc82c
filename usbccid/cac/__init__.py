"""The emulated DoD Common Access Card (GSC-IS 2.1), sans-IO."""
