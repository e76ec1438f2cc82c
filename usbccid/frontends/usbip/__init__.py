"""The USB/IP front end: each reader a USB CCID device (``frontend``), the asyncio
TCP shell that exports them (``server``)."""
