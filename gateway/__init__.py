"""A hardened real-time WebSocket gateway: authenticated JSON chat over wss.

Start with ``python -m gateway serve``; the wire contract is docs/protocol.md and every
setting is in docs/configuration.md.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
