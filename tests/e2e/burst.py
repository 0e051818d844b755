"""A burst of WebSocket upgrades from a process of its own: ``python -m tests.e2e.burst``.

The test's gateway serves on the test's event loop; clients on that same loop would take turns
with it and never hit it all at once. From another process, every upgrade arrives together, as
a burst from many browsers does.

Reads one JSON object on stdin: ``url``, ``ca_file`` (the PEM CA to trust), ``tokens`` (one
upgrade per token, all at once) and ``open_timeout`` (seconds). Every connection that opens
reads its first frame and stays open until all the others have been tried, then closes. Prints
one JSON object: ``accepted`` (how many were welcomed), ``refused`` (HTTP status -> how many,
with the ``error`` of each body -> how many in ``errors``) and ``failed`` (anything else, as
text).
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import sys
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

__all__ = ["main"]


async def _upgrade(
    url: str, token: str, context: ssl.SSLContext, open_timeout: float
) -> ClientConnection | InvalidStatus | str:
    try:
        ws = await websockets.connect(
            url,
            ssl=context,
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=open_timeout,
        )
    except InvalidStatus as refused:
        return refused
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    try:
        async with asyncio.timeout(open_timeout):
            frame = json.loads(await ws.recv())
    except Exception as error:
        await ws.close()
        return f"no welcome: {type(error).__name__}: {error}"
    if frame.get("type") != "welcome":
        await ws.close()
        return f"first frame: {frame.get('type')}"
    return ws


async def _burst(config: dict[str, Any]) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=config["ca_file"])
    outcomes = await asyncio.gather(
        *(
            _upgrade(config["url"], token, context, config["open_timeout"])
            for token in config["tokens"]
        )
    )
    opened = [ws for ws in outcomes if isinstance(ws, ClientConnection)]
    refused = [error for error in outcomes if isinstance(error, InvalidStatus)]
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    errors = collections.Counter(
        json.loads(error.response.body or b"{}").get("error", "?") for error in refused
    )
    return {
        "accepted": len(opened),
        "refused": collections.Counter(str(error.response.status_code) for error in refused),
        "errors": errors,
        "failed": [outcome for outcome in outcomes if isinstance(outcome, str)],
    }


def main() -> None:
    config = json.load(sys.stdin)
    print(json.dumps(asyncio.run(_burst(config))))


if __name__ == "__main__":
    main()
