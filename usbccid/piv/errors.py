"""The PIV layer's error family: every failure carries the status word it becomes.

:class:`PivError` is a :class:`~usbccid.cac.errors.CardError`: the PIV edge reuses the ISO
7816-4 APDU parsing of :mod:`usbccid.cac.apdu` (whose malformed-APDU error is a
``CardError``), so the card OS (:mod:`usbccid.piv.card`) converts one family, in one
place, into a response APDU. Messages never contain PINs, keys or other secrets.
"""

from __future__ import annotations

from usbccid.cac.errors import CardError


class PivError(CardError):
    """A PIV command failed; ``sw`` is the status word (SP 800-73-4 Part 2 §3) the host gets."""
