"""QEMU ccid-card-passthru front end: our card in QEMU's own usb-ccid reader over VSCard.

``wire`` (the messages), ``client`` (one connection, sans-IO, a state table), ``errors``
(the layer's error family), ``server`` (the asyncio shell: one reader, listening or
connecting) and ``frontend`` (the readers of the configuration, for the composition root).
"""
