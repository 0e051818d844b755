"""The JSON Web Key Set of ``GATEWAY_JWT_JWKS_URL``, fetched as an attacker would wish it were
not: bounded, pinned to its hosts, and kept through an outage of the endpoint.

- **Fresh, then stale, then gone.** A key set fetched less than ``fresh_seconds`` ago
  (``GATEWAY_JWT_JWKS_CACHE_SECONDS``) is used as it is. Older, it is still used, and one
  refresh runs in the background; if that fails, the last good keys keep verifying tokens until
  they are ``max_stale_seconds`` old (``GATEWAY_JWT_JWKS_MAX_STALE_SECONDS``), so an endpoint
  that is down for a while does not refuse every valid token. Past that, a verification waits
  for a fetch, and fails with ``jwks_unavailable`` if there is none.
- **Unknown kids do not set off fetches.** A token naming a key the set does not hold may be
  the first of a rotation: the set is fetched again, but at most once per
  :data:`REFETCH_INTERVAL_SECONDS`, however many such tokens arrive.
- **One fetch at a time**, off the event loop, with a timeout; every waiter shares it.
- **Pinned**: a redirect is followed only to a host of ``allowed_hosts`` (by default the URL's
  own host alone) and never from https to http; the body is read up to ``max_bytes`` and a
  larger one is refused, whatever its ``Content-Length`` says.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import jwt

__all__ = [
    "MAX_BYTES",
    "REFETCH_INTERVAL_SECONDS",
    "TIMEOUT_SECONDS",
    "JwksCache",
    "JwksError",
]

log = logging.getLogger("gateway.auth")

#: The largest key set read (a set of a few keys is 1 to 10 KiB).
MAX_BYTES = 64 * 1024
#: A key set is fetched again for an unknown kid at most this often.
REFETCH_INTERVAL_SECONDS = 60.0
#: Connect and read timeout of one fetch.
TIMEOUT_SECONDS = 5.0


class JwksError(Exception):
    """The key set cannot be fetched or used (the reason is for the log)."""


class _Pinned(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed host, and never from https to http."""

    def __init__(self, allowed_hosts: frozenset[str]) -> None:
        self._allowed = allowed_hosts

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        refusal = None
        if old.scheme == "https" and new.scheme != "https":
            refusal = f"a redirect from https to {new.scheme or 'nothing'} is not followed"
        elif (new.hostname or "").lower() not in self._allowed:
            refusal = f"a redirect to {new.hostname!r} is not followed (not an allowed host)"
        if refusal is not None:
            fp.close()  # the redirect's own response: its socket goes now
            raise JwksError(refusal)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_key_set(
    url: str, allowed_hosts: frozenset[str], max_bytes: int = MAX_BYTES
) -> dict[str, jwt.PyJWK]:
    """GET ``url`` and read it as a key set: kid -> key (keys without a kid are left out).

    Blocking: call it in a thread.

    Raises:
        JwksError: on any failure (network, status, size, JSON, no usable key).
    """
    if urlsplit(url).scheme not in ("https", "http"):  # settings allow these alone
        raise JwksError("the key set URL is not http(s)")
    context = ssl.create_default_context()  # the system's CAs, or SSL_CERT_FILE's
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _Pinned(allowed_hosts)
    )
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    try:
        with opener.open(request, timeout=TIMEOUT_SECONDS) as response:
            if response.status != 200:
                raise JwksError(f"the key set answered {response.status}")
            body = response.read(max_bytes + 1)
    except JwksError:
        raise
    except urllib.error.HTTPError as error:
        error.close()
        raise JwksError(f"the key set answered {error.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise JwksError(f"the key set cannot be fetched: {type(error).__name__}") from None
    if len(body) > max_bytes:
        raise JwksError(f"the key set is larger than {max_bytes} bytes")
    try:
        data = json.loads(body)
        key_set = jwt.PyJWKSet.from_dict(data)
    except (ValueError, TypeError, AttributeError, jwt.PyJWTError) as error:
        raise JwksError(f"the key set cannot be used: {type(error).__name__}") from None
    keys = {key.key_id: key for key in key_set.keys if isinstance(key.key_id, str)}
    if not keys:
        raise JwksError("the key set holds no key with a kid")
    return keys


class JwksCache:
    """The key set of ``url`` (see the module's text).

    Args:
        url: the JWKS URL.
        fresh_seconds: how long a fetched set is used without a refresh.
        max_stale_seconds: how long the last good set is used while refreshes fail.
        allowed_hosts: hosts a redirect may lead to; the URL's own host when empty.
        clock: monotonic seconds; tests pass a fake one.
        fetch: the blocking fetch (:func:`fetch_key_set`); tests may pass another.
    """

    def __init__(
        self,
        url: str,
        *,
        fresh_seconds: float,
        max_stale_seconds: float,
        allowed_hosts: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[str, frozenset[str]], dict[str, jwt.PyJWK]] = fetch_key_set,
    ) -> None:
        self._url = url
        self._fresh = fresh_seconds
        self._max_stale = max(max_stale_seconds, fresh_seconds)
        hosts = frozenset(host.lower() for host in allowed_hosts)
        self._hosts = hosts or frozenset({(urlsplit(url).hostname or "").lower()})
        self._clock = clock
        self._fetch = fetch
        self._keys: dict[str, jwt.PyJWK] | None = None
        self._fetched_at = 0.0
        self._attempted_at: float | None = None
        self._running: asyncio.Task[None] | None = None

    @property
    def fetched_at(self) -> float | None:
        """When the keys in use were fetched (clock seconds), None before the first."""
        return self._fetched_at if self._keys is not None else None

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key ``kid`` names.

        Raises:
            JwksError: there is no usable key set (never fetched, or too old and the endpoint
                fails).
            KeyError: the set holds no such key (after at most one refetch per interval).
        """
        now = self._clock()
        if self._keys is None or now - self._fetched_at > self._max_stale:
            await self._refresh()
        elif now - self._fetched_at > self._fresh:
            self._refresh_in_background()
        keys = self._keys
        assert keys is not None  # _refresh raised otherwise
        found = keys.get(kid)
        if found is not None:
            return found
        attempted = self._attempted_at
        if attempted is None or self._clock() - attempted >= REFETCH_INTERVAL_SECONDS:
            try:  # perhaps a rotation: look once more, at most once per interval
                await self._refresh()
            except JwksError:
                pass
            found = (self._keys or {}).get(kid)
            if found is not None:
                return found
        raise KeyError(kid)

    def _refresh_in_background(self) -> None:
        if self._running is None:
            task = asyncio.ensure_future(self._refresh())
            task.add_done_callback(_quiet)

    async def _refresh(self) -> None:
        """Fetch the set (sharing a fetch already running); keeps the old set on failure.

        Raises:
            JwksError: the fetch failed and there is no set young enough to keep using.
        """
        running = self._running
        if running is None:
            running = self._running = asyncio.ensure_future(self._fetch_now())
        try:
            await asyncio.shield(running)
        except JwksError:
            if self._keys is None or self._clock() - self._fetched_at > self._max_stale:
                raise

    async def _fetch_now(self) -> None:
        self._attempted_at = self._clock()
        try:
            keys = await asyncio.to_thread(self._fetch, self._url, self._hosts)
        except JwksError as error:
            age = None if self._keys is None else round(self._clock() - self._fetched_at)
            log.warning(
                "the key set could not be refreshed", extra={"why": str(error), "age_s": age}
            )
            raise
        finally:
            self._running = None
        self._keys, self._fetched_at = keys, self._clock()


def _quiet(task: asyncio.Future[None]) -> None:
    """A background refresh's failure is logged where it happens; nothing more to do."""
    if not task.cancelled():
        task.exception()
