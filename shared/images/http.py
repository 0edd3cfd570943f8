"""HTTP(S) fetches that connect only where the policy allows, with bounded time and size.

Each hop (the URL, then every redirect) is checked against COFEAT_IMAGE_HOSTS, its name is
resolved here and every address it resolves to is checked (`Policy.check_addresses`), and
the connection goes to the checked address itself (libcurl's RESOLVE pins the name to it),
with the name as Host header, TLS SNI and certificate name. So a name that resolves
differently the second time (DNS rebinding) cannot lead the fetch to an address that was
never checked. libcurl follows no redirect, uses no proxy from the environment and retries
nothing on its own: redirects are hops here, retries are shared/retry.py's.

libcurl (pycurl) rather than urllib3: a fetch costs ~0.06 ms of CPU against ~0.2 for bare
urllib3, whose header parsing is pure Python, and it runs without the GIL, which the
embedder's decoding and model threads need (benchmarks/images.py).
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import ssl
import threading
import time
from urllib.parse import urljoin, urlsplit

import pycurl

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
_INHERITED: list[pycurl.Curl] = []  # handles a forked process came with, kept from cleanup
_TLS_ERRORS = frozenset(getattr(pycurl, name) for name in dir(pycurl)
                        if name.startswith("E_SSL") or name == "E_PEER_FAILED_VERIFICATION")


class HttpFetcher:
    def __init__(self, policy: Policy, *, connect_s: float, read_s: float, total_s: float,
                 max_bytes: int):
        self.policy = policy
        self.connect_s, self.read_s, self.total_s = connect_s, read_s, total_s
        self.max_bytes = max_bytes
        # The operator's CA bundle (SSL_CERT_FILE, SSL_CERT_DIR) or the system's, as Python's
        # ssl module finds them: the libcurl in pycurl's wheel has its own default.
        paths = ssl.get_default_verify_paths()
        self.cafile, self.capath = paths.cafile, paths.capath
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._handles = threading.local()  # one libcurl handle (and its connections) a thread
        self._dns: dict[tuple[str, int], tuple[float, str]] = {}

    def __getstate__(self) -> dict:
        # DataLoader workers get their own handles: sockets must not be shared across forks.
        state = self.__dict__.copy()
        for name in ("_handles", "_dns"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

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
            status, body, location_header = self._get(_rebuilt(scheme, host, port, parts),
                                                       host, port, address, deadline)
            if status in REDIRECTS:
                url = self._redirect(url, scheme, status, location_header)
                continue
            _check_status(status)
            return body
        raise Unreadable(f"more than {MAX_REDIRECTS} redirects")

    def _redirect(self, url: str, scheme: str, status: int, location: str | None) -> str:
        if not location:
            raise Unreadable(f"HTTP {status} without a Location")
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

    def _handle(self) -> pycurl.Curl:
        held = getattr(self._handles, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        if held is not None:
            # Forked (DataLoader workers fork, and the forking thread's locals come along):
            # that handle's connections are the parent's sockets. Never use it, and never
            # clean it up here, which could close the parent's TLS sessions.
            _INHERITED.append(held[1])
        curl = self._new_handle()
        self._handles.held = (os.getpid(), curl)
        return curl

    def _new_handle(self) -> pycurl.Curl:
        curl = pycurl.Curl()
        options = {
            pycurl.NOSIGNAL: 1, pycurl.FOLLOWLOCATION: 0, pycurl.PROXY: "",
            pycurl.PROTOCOLS: pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS,
            pycurl.HTTPHEADER: ["Accept: image/*", "User-Agent: cofeat-images"],
            pycurl.MAXFILESIZE_LARGE: self.max_bytes, pycurl.BUFFERSIZE: CHUNK,
            # No byte for read_s (whole seconds in libcurl): the server went silent.
            pycurl.LOW_SPEED_LIMIT: 1,
            pycurl.LOW_SPEED_TIME: max(1, math.ceil(self.read_s)),
            pycurl.SSL_VERIFYPEER: 1, pycurl.SSL_VERIFYHOST: 2,
        }
        for option, value in options.items():
            curl.setopt(option, value)
        if self.cafile:
            curl.setopt(pycurl.CAINFO, self.cafile)
        if self.capath:
            curl.setopt(pycurl.CAPATH, self.capath)
        return curl

    def _get(self, url: str, host: str, port: int, address: str,
             deadline: float) -> tuple[int, bytes, str | None]:
        """(status, body, Location) of one GET to the checked address."""
        curl = self._handle()
        body = _Body(self.max_bytes)
        curl.setopt(pycurl.URL, url)
        if not _literal(host):  # an address in the URL is connected to as it is
            pinned = f"[{address}]" if ":" in address else address
            curl.setopt(pycurl.RESOLVE, [f"-{host}:{port}", f"{host}:{port}:{pinned}"])
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, _ms(min(self.connect_s, _left(deadline))))
        curl.setopt(pycurl.TIMEOUT_MS, _ms(_left(deadline)))
        curl.setopt(pycurl.WRITEFUNCTION, body.write)
        curl.setopt(pycurl.HEADERFUNCTION, body.header)
        try:
            curl.perform()
        except pycurl.error as error:
            code, message = error.args
            if body.too_large or code == pycurl.E_FILESIZE_EXCEEDED:
                raise TooLarge(self.max_bytes) from None
            if code == pycurl.E_OPERATION_TIMEDOUT:
                raise Unavailable("timed out") from None
            if code == pycurl.E_URL_MALFORMAT:
                raise Unreadable(f"not a URL libcurl takes: {message[:160]}") from None
            if code in _TLS_ERRORS:
                # Host-wide and an operator's to fix (an expired or wrong certificate):
                # parking every image of the host meanwhile would keep them out after it.
                raise Unavailable(f"TLS: {message[:160]}") from None
            raise Unavailable(f"curl error {code}: {message[:160]}") from None
        if not _same_address(curl.getinfo(pycurl.PRIMARY_IP), address):
            raise Refused  # libcurl went elsewhere than checked: never trust what came back
        return curl.getinfo(pycurl.RESPONSE_CODE), body.data(), body.location


class _Body:
    """A response's body, counted while it arrives, and its Location header."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.location: str | None = None

    def write(self, chunk: bytes) -> int | None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.too_large = True
            return 0  # libcurl aborts the transfer
        self.chunks.append(chunk)
        return None

    def header(self, line: bytes) -> None:
        if line[:5].upper() == b"HTTP/":
            self.location = None  # a new response (after an interim one) starts
        elif line[:9].lower() == b"location:":
            self.location = line[9:].strip().decode("latin-1")

    def data(self) -> bytes:
        return b"".join(self.chunks)


def _rebuilt(scheme: str, host: str, port: int, parts) -> str:
    """The URL libcurl gets, from the parts checked here: where its URL parser and Python's
    would read a crafted authority differently, the host is still the one checked."""
    name = f"[{host}]" if ":" in host else host
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return f"{scheme}://{name}:{port}{target}"


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _same_address(connected: str, checked: str) -> bool:
    address = _address(connected)
    return address is not None and address == _address(checked)


def _literal(host: str) -> bool:
    return _address(host) is not None


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


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
