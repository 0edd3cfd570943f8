"""HTTP(S) fetches that connect only where the policy allows, with bounded time and size.

Each hop (the URL, then every redirect) is checked against COFEAT_IMAGE_HOSTS, its name is
resolved here and every address it resolves to is checked (`Policy.check_addresses`), and
the connection goes to the checked address itself, with the name as Host header, TLS SNI
and certificate name. So a name that resolves differently the second time (DNS rebinding)
cannot lead the fetch to an address that was never checked. urllib3 follows no redirect
and retries nothing on its own: redirects are hops here, retries are shared/retry.py's.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from shared.images.errors import (
    Denied,
    NotFound,
    Refused,
    TooLarge,
    Unavailable,
    Unreadable,
)
from shared.images.policy import HTTP_SCHEMES, HttpUrl, Policy, normal_host

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 256 * 1024
DNS_TTL_S = 30.0


class HttpFetcher:
    def __init__(self, policy: Policy, *, connect_s: float, read_s: float, total_s: float,
                 max_bytes: int, pool_size: int):
        self.policy = policy
        self.connect_s, self.read_s, self.total_s = connect_s, read_s, total_s
        self.max_bytes, self.pool_size = max_bytes, pool_size
        self._lock = threading.Lock()
        self._pools: dict[tuple, urllib3.HTTPConnectionPool] = {}
        self._dns: dict[tuple[str, int], tuple[float, str]] = {}

    def __getstate__(self) -> dict:
        # DataLoader workers get their own pools: sockets must not be shared across forks.
        state = self.__dict__.copy()
        state.update(_lock=None, _pools={}, _dns={})
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def fetch(self, location: HttpUrl) -> bytes:
        deadline = time.monotonic() + self.total_s
        url = location.url
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            host = normal_host(parts.hostname or "")
            if scheme not in HTTP_SCHEMES or not host or not self.policy.host_listed(host):
                raise Refused
            port = parts.port or (443 if scheme == "https" else 80)
            address = self.resolve(host, port)
            response = self._request(scheme, address, host, port, parts, deadline)
            body = None
            try:
                if response.status in REDIRECTS:
                    url = self._redirect(url, scheme, response)
                else:
                    _check_status(response.status)
                    body = self._body(response, deadline)
            finally:
                if body is None:  # a redirect's body or a refused one: not worth reading
                    response.close()
                response.release_conn()
            if body is not None:
                return body
        raise Unreadable(f"more than {MAX_REDIRECTS} redirects")

    def _redirect(self, url: str, scheme: str, response) -> str:
        location = response.headers.get("Location")
        if not location:
            raise Unreadable(f"HTTP {response.status} without a Location")
        target = urljoin(url, location)
        new_scheme = urlsplit(target).scheme.lower()
        if new_scheme not in HTTP_SCHEMES or (scheme == "https" and new_scheme == "http"):
            raise Refused  # another scheme, or a downgrade from TLS
        return target

    # -- resolution --------------------------------------------------------------------

    def resolve(self, host: str, port: int) -> str:
        """A checked address for `host`; every address it resolves to must pass."""
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached and cached[0] > now:
            return cached[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            if error.errno == socket.EAI_NONAME:
                raise Unreadable(f"{host} does not resolve") from None
            raise Unavailable(f"resolving {host}: {error.strerror}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        self.policy.check_addresses(host, addresses)
        self._dns[(host, port)] = (now + DNS_TTL_S, addresses[0])
        return addresses[0]

    # -- the request -------------------------------------------------------------------

    def _pool(self, scheme: str, address: str, host: str, port: int):
        key = (os.getpid(), scheme, address, host, port)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                options = {"maxsize": self.pool_size, "block": False, "retries": False}
                if scheme == "https":
                    pool = urllib3.HTTPSConnectionPool(
                        address, port, server_hostname=host, assert_hostname=host,
                        cert_reqs="CERT_REQUIRED", **options)
                else:
                    pool = urllib3.HTTPConnectionPool(address, port, **options)
                self._pools[key] = pool
            return pool

    def _request(self, scheme: str, address: str, host: str, port: int, parts, deadline):
        default_port = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host
        headers = {"Host": name if port == default_port else f"{name}:{port}",
                   "Accept": "image/*", "Accept-Encoding": "identity",
                   "User-Agent": "cofeat-images"}
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        timeout = urllib3.Timeout(connect=min(self.connect_s, _left(deadline)),
                                  read=min(self.read_s, _left(deadline)))
        try:
            return self._pool(scheme, address, host, port).urlopen(
                "GET", target, headers=headers, redirect=False, retries=False,
                preload_content=False, decode_content=False, assert_same_host=False,
                timeout=timeout)
        except Exception as error:
            raise _transport_error(error) from None

    def _body(self, response, deadline: float) -> bytes:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise TooLarge(self.max_bytes)
        chunks, total = [], 0
        while True:
            if time.monotonic() > deadline:
                raise Unavailable(f"timed out after {self.total_s:g} s")
            try:
                chunk = response.read1(CHUNK)  # what arrived: the deadline is checked per recv
            except Exception as error:
                raise _transport_error(error) from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self.max_bytes:
                raise TooLarge(self.max_bytes)
            chunks.append(chunk)


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _check_status(status: int) -> None:
    if status == 200:
        return
    if status in (404, 410):
        raise NotFound(f"HTTP {status}")
    if status in (401, 403):
        raise Denied(f"HTTP {status}")
    if status in (408, 425, 429) or status >= 500:
        raise Unavailable(f"HTTP {status}")
    raise Unreadable(f"HTTP {status}")


def _transport_error(error: Exception) -> Exception:
    if isinstance(error, SSLError):
        # Host-wide and an operator's to fix (an expired or wrong certificate): parking
        # every image of the host meanwhile would keep them out after the fix.
        return Unavailable(f"TLS: {str(error)[:160]}")
    if isinstance(error, Urllib3Timeout | TimeoutError):
        return Unavailable("timed out")
    if isinstance(error, HTTPError | OSError):
        return Unavailable(f"{type(error).__name__}: {str(error)[:160]}")
    return error
