"""How hosts reach readers: one package per front end (``usbip``), ``registry`` names them."""
