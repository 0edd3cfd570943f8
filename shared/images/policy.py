"""Where an image_uri may point: allowed local roots, HTTP(S) hosts and object-store buckets.

`Policy.locate` turns an image_uri into a `Location` or raises `Refused`, before any byte is
read. Local paths are checked after `..` and symlinks are resolved (the readers check again
on the opened file); host names are checked again after DNS resolution, at every redirect
(`check_addresses`). Every refusal is the same `Refused`, so nothing is revealed about what
exists behind a location that is not allowed.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from shared.images.errors import Refused

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
HTTP_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class LocalFile:
    path: str  # absolute, symlinks and `..` resolved, inside a root

    @property
    def key(self) -> str:
        return self.path


@dataclass(frozen=True)
class HttpUrl:
    url: str
    host: str  # lower case, no trailing dot

    @property
    def key(self) -> str:
        return self.url


@dataclass(frozen=True)
class StoreObject:
    """An object in an fsspec filesystem (s3://bucket/key, gs://bucket/key, ...)."""

    scheme: str
    bucket: str
    key_path: str

    @property
    def key(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key_path}"


Location = LocalFile | HttpUrl | StoreObject


def split_list(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def normal_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    try:
        return ipaddress.ip_address(host.strip("[]")).compressed
    except ValueError:
        return host


@dataclass(frozen=True)
class Policy:
    data_dir: str
    roots: tuple[str, ...]
    hosts: frozenset[str] = frozenset()  # exact names and addresses
    suffixes: tuple[str, ...] = ()  # ".example.com" from "*.example.com"
    any_host: bool = False  # "*": any host whose addresses are public
    buckets: tuple[tuple[str, str, str], ...] = ()  # (scheme, bucket, key prefix)

    @classmethod
    def from_settings(cls, settings) -> Policy:
        data_dir = os.path.realpath(settings.data_dir)
        roots = split_list(settings.image_roots) or [os.path.join(data_dir, "images")]
        hosts, suffixes, any_host = set(), [], False
        for entry in split_list(settings.image_hosts):
            if entry == "*":
                any_host = True
            elif entry.startswith("*."):
                suffixes.append(normal_host(entry[1:]))
            else:
                hosts.add(normal_host(entry))
        return cls(data_dir, tuple(os.path.realpath(os.path.join(data_dir, r)) for r in roots),
                   frozenset(hosts), tuple(suffixes), any_host,
                   tuple(_bucket(entry) for entry in split_list(settings.image_buckets)))

    @classmethod
    def local_files(cls, *roots: str | os.PathLike) -> Policy:
        """Local files under `roots` only (default: anywhere): for files a caller chose
        itself (tests, tools), never for image_uris that arrive in events."""
        return cls(os.getcwd(), tuple(os.path.realpath(r) for r in roots) or ("/",))

    # -- parsing -----------------------------------------------------------------------

    def locate(self, uri: str) -> Location:
        if not isinstance(uri, str) or not uri or "\x00" in uri:
            raise Refused
        match = _SCHEME.match(uri)
        if match is None:
            return self.local(uri)
        scheme = match.group(1).lower()
        if scheme == "file":
            parts = urlsplit(uri)
            if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
                raise Refused
            return self.local(unquote(parts.path))
        if scheme in HTTP_SCHEMES:
            return self.http(uri)
        return self.store(scheme, uri[match.end():])

    def local(self, path: str) -> LocalFile:
        if not path or "\x00" in path:
            raise Refused
        real = os.path.realpath(os.path.join(self.data_dir, path))
        if not self.inside_roots(real):
            raise Refused
        return LocalFile(real)

    def inside_roots(self, real: str) -> bool:
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep)
                   for root in self.roots)

    def http(self, url: str) -> HttpUrl:
        try:
            parts = urlsplit(url)
            host, _port = parts.hostname, parts.port  # .port raises on a bad port
        except ValueError:
            raise Refused from None
        if not host or parts.username is not None or parts.password is not None:
            raise Refused
        host = normal_host(host)
        if not self.host_listed(host):
            raise Refused
        return HttpUrl(url, host)

    def store(self, scheme: str, rest: str) -> StoreObject:
        # fsspec chains filesystems with "::" (simplecache::s3://...): never from an event.
        if "::" in rest or "\\" in rest:
            raise Refused
        bucket, _, key = rest.partition("/")
        segments = key.split("/")
        if not bucket or not key or any(s in (".", "..") for s in segments):
            raise Refused
        for allowed_scheme, allowed_bucket, prefix in self.buckets:
            if (scheme, bucket) == (allowed_scheme, allowed_bucket) and key.startswith(prefix):
                return StoreObject(scheme, bucket, key)
        raise Refused

    # -- hosts -------------------------------------------------------------------------

    def host_listed(self, host: str) -> bool:
        return (self.any_host or host in self.hosts
                or any(host.endswith(suffix) for suffix in self.suffixes))

    def check_addresses(self, host: str, addresses: list[str]) -> None:
        """Refuse a name that resolves to a private, loopback, link-local or otherwise
        non-public address, unless that exact name or that address is listed."""
        if not addresses:
            raise Refused
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not ip.is_global and host not in self.hosts and ip.compressed not in self.hosts:
                raise Refused


def _bucket(entry: str) -> tuple[str, str, str]:
    match = _SCHEME.match(entry)
    scheme, rest = (match.group(1).lower(), entry[match.end():]) if match else ("s3", entry)
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"COFEAT_IMAGE_BUCKETS: {entry!r} names no bucket")
    # "s3://b/images" means the folder images/, not every key starting "images".
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return scheme, bucket, prefix
