"""The host side of USB/IP: a client that imports exported devices, for tests and tools.

``pdu`` is the sans-IO client protocol (bytes in, events out), ``descriptors`` parses USB
descriptors as a host does, ``session`` is the TCP transport. ``usbccid.host.pyusb_backend``
puts pyusb on top. None of it shares code with the server in ``usbccid.usbip``.
"""
