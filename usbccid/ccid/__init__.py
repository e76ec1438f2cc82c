"""The CCID class (USB CCID rev 1.1) behind the virtual device's endpoints, sans-IO."""
