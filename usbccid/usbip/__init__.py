"""USB/IP (Linux ``Documentation/usb/usbip_protocol.rst``) and the virtual USB device, sans-IO."""
