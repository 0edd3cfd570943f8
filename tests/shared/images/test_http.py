"""HTTP(S) image_uris against a real server on loopback: normal, slow, 404, 500-then-200,
oversized, bomb and redirect responses, under COFEAT_IMAGE_HOSTS."""

from __future__ import annotations

import pytest

from shared.images import (
    REFUSED,
    Denied,
    ImageError,
    ImageReader,
    NotFound,
    Policy,
    Refused,
    TooLarge,
    TooManyPixels,
    Unavailable,
    Unreadable,
)
from shared.settings import Settings


def reader_for(tmp_path, **overrides) -> ImageReader:
    values = {"data_dir": tmp_path, "image_hosts": "127.0.0.1", "image_cache_bytes": 0,
              "image_read_timeout_s": 0.5, "image_fetch_timeout_s": 2.0,
              "image_fetch_attempts": 3, **overrides}
    return ImageReader.from_settings(Settings(**values))


def reason(reader: ImageReader, url: str) -> str:
    try:
        reader.read(url)
    except ImageError as error:
        return error.reason
    return "read"


def test_an_allowed_host_serves_and_decodes(image_server, tmp_path):
    reader = reader_for(tmp_path)
    assert reader.open(image_server.url("files/ok.png"), 32).size == (64, 48)
    assert reader.read(image_server.url("files/ok.png?v=2")).startswith(b"\x89PNG")


def test_hosts_are_allowed_by_name_or_address_exactly(image_server, tmp_path):
    port = image_server.port
    listed_address = reader_for(tmp_path)  # "127.0.0.1"
    assert reason(listed_address, f"http://localhost:{port}/files/ok.png") == REFUSED
    assert reason(listed_address, f"http://127.1:{port}/files/ok.png") == REFUSED
    assert reason(listed_address, f"http://user:pw@127.0.0.1:{port}/files/ok.png") == REFUSED
    # "*" allows any host whose addresses are public: loopback is not, unless listed.
    anywhere = reader_for(tmp_path, image_hosts="*")
    for host in ("127.0.0.1", "localhost", "127.1", "2130706433", "[::ffff:127.0.0.1]"):
        assert reason(anywhere, f"http://{host}:{port}/files/ok.png") == REFUSED, host
    assert reason(reader_for(tmp_path, image_hosts="*,127.0.0.1"),
                  f"http://127.0.0.1:{port}/files/ok.png") == "read"
    # A listed name may resolve to a private address: the operator said so by name.
    assert reason(reader_for(tmp_path, image_hosts="localhost"),
                  f"http://localhost:{port}/files/ok.png") == "read"
    # A wildcard does not vouch for private addresses behind the names it matches (checked
    # on the policy: no name here resolves under a suffix of our own).
    policy = Policy.from_settings(Settings(image_hosts="*.cdn.example,img.cdn.example,10.1.2.3"))
    assert policy.host_listed("a.cdn.example") and not policy.host_listed("cdn.example.org")
    policy.check_addresses("a.cdn.example", ["93.184.215.14", "2606:2800:21f:cb07::1"])
    for private in ("10.0.0.5", "192.168.1.1", "169.254.169.254", "::1", "fd00::1",
                    "::ffff:10.0.0.5", "100.64.0.1", "0.0.0.0"):
        with pytest.raises(Refused):
            policy.check_addresses("a.cdn.example", ["93.184.215.14", private])
    policy.check_addresses("img.cdn.example", ["10.0.0.5"])  # that exact name is listed
    policy.check_addresses("a.cdn.example", ["10.1.2.3"])  # that exact address is listed
    assert reason(reader_for(tmp_path, image_hosts=""),
                  image_server.url("files/ok.png")) == REFUSED


def test_permanent_answers_fail_at_once_with_their_reason(image_server, tmp_path):
    reader = reader_for(tmp_path)
    image_server.reset()
    with pytest.raises(NotFound, match="HTTP 404"):
        reader.read(image_server.url("status/404"))
    with pytest.raises(Denied, match="HTTP 403"):
        reader.read(image_server.url("status/403"))
    with pytest.raises(Unreadable, match="HTTP 400"):
        reader.read(image_server.url("status/400"))
    assert image_server.requests("status/404") == 1  # not retried


def test_a_server_error_is_retried_with_backoff_until_it_answers(image_server, tmp_path):
    image_server.reset()
    reader = reader_for(tmp_path, image_fetch_attempts=3)
    assert reader.open(image_server.url("flaky/2/ok.png")).size == (64, 48)
    assert image_server.requests("flaky/2/ok.png") == 3
    # With fewer attempts than failures it is transient: the caller retries later.
    with pytest.raises(Unavailable, match="HTTP 503"):
        reader_for(tmp_path, image_fetch_attempts=2).read(image_server.url("flaky/5/ok.png"))


def test_a_failing_host_is_left_alone_for_a_while(image_server, tmp_path):
    image_server.reset()
    reader = reader_for(tmp_path, image_fetch_attempts=1)
    with pytest.raises(Unavailable):
        reader.read(image_server.url("status/503"))
    # Its other images fail at once, without a request, until the backoff is over.
    with pytest.raises(Unavailable, match="is failing"):
        reader.read(image_server.url("files/ok.png"))
    assert image_server.requests("files/ok.png") == 0


def test_slow_servers_time_out(image_server, tmp_path):
    reader = reader_for(tmp_path, image_fetch_attempts=1)
    with pytest.raises(Unavailable, match="timed out"):  # silent past the read timeout
        reader.read(image_server.url("slow/3/ok.png"))
    reader = reader_for(tmp_path, image_fetch_attempts=1, image_read_timeout_s=1.0,
                        image_fetch_timeout_s=1.0)
    with pytest.raises(Unavailable, match="timed out"):  # a byte every 0.2 s, forever
        reader.read(image_server.url("drip/ok.png"))


def test_oversized_bodies_are_refused_while_reading(image_server, tmp_path):
    reader = reader_for(tmp_path, image_max_bytes=1024 * 1024)
    with pytest.raises(TooLarge):  # from Content-Length
        reader.read(image_server.url(f"big/{2 * 1024 * 1024}"))
    with pytest.raises(TooLarge):  # chunked: no length announced, counted while reading
        reader.read(image_server.url(f"chunked/{64 * 1024 * 1024}"))
    assert len(reader.read(image_server.url(f"big/{1024 * 1024}"))) == 1024 * 1024


def test_bombs_over_http_are_refused(image_server, tmp_path):
    reader = reader_for(tmp_path)
    for name in ("bomb.png", "bomb.jpg"):
        with pytest.raises(TooManyPixels):
            reader.open(image_server.url(f"files/{name}"), 64)


def test_redirects_are_checked_at_every_hop(image_server, tmp_path):
    reader = reader_for(tmp_path)
    port = image_server.port
    inside = image_server.url(f"redirect?to=http://127.0.0.1:{port}/files/ok.png")
    assert reason(reader, inside) == "read"
    assert reason(reader, image_server.url("redirect?to=/files/ok.png")) == "read"
    for target in (f"http://localhost:{port}/files/ok.png", "http://example.com/x.png",
                   "http://169.254.169.254/latest/meta-data/", "file:///etc/hostname",
                   "s3://bucket/key.png"):
        assert reason(reader, image_server.url(f"redirect?to={target}")) == REFUSED, target
    assert reason(reader, image_server.url("redirect")) == "more than 5 redirects"


def test_fetches_run_concurrently_and_come_back_in_order(image_server, tmp_path):
    image_server.reset()
    reader = reader_for(tmp_path, image_fetch_concurrency=8)
    uris = [image_server.url(f"slow/0.3/{'ok' if n % 2 else 'other'}.png?n={n}")
            for n in range(16)]
    uris.insert(5, image_server.url("status/404"))
    results = list(reader.fetch_many(uris))
    assert isinstance(results[5], NotFound)
    sizes = [reader.decode(r).getpixel((0, 0)) for r in results if isinstance(r, bytes)]
    assert sizes == [(200, 10, 30), (10, 200, 30)] * 8  # in the order asked
    assert image_server.stats()["max_in_flight"] > 1


def self_signed(folder, *names: str):
    """(certificate, key) files for these DNS names / IP addresses, self-signed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternatives = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / f"{names[0]}.crt", folder / f"{names[0]}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_verifies_the_url_name_on_the_checked_address(image_server, tmp_path,
                                                            monkeypatch):
    """The connection goes to the address cofeat resolved and checked, while SNI and the
    certificate check use the URL's name: a certificate for another name is refused."""
    from tests.conftest import free_port
    from tests.imageserver import ImageServer

    good = self_signed(tmp_path, "localhost", "127.0.0.1")
    wrong = self_signed(tmp_path, "wrong.example")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(good[0].read_bytes() + wrong[0].read_bytes())
    servers = [ImageServer(free_port(), image_server.directory, tls) for tls in (good, wrong)]
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the operator's private CA bundle
        reader = reader_for(tmp_path, image_hosts="localhost,127.0.0.1",
                            image_fetch_attempts=1)
        ok, other = (f"https://{{}}:{s.port}/files/ok.png" for s in servers)
        assert reader.open(ok.format("localhost")).size == (64, 48)
        assert reader.open(ok.format("127.0.0.1")).size == (64, 48)
        with pytest.raises(Unavailable, match="TLS"):  # the name does not match
            reader_for(tmp_path, image_hosts="localhost,127.0.0.1").read(
                other.format("localhost"))
        monkeypatch.delenv("SSL_CERT_FILE")
        with pytest.raises(Unavailable, match="TLS"):  # an issuer nobody trusts
            reader_for(tmp_path, image_hosts="localhost").read(ok.format("localhost"))
    finally:
        for server in servers:
            server.close()


def test_libcurl_gets_the_url_rebuilt_from_the_parts_checked(image_server, tmp_path):
    """Where Python's URL parser and libcurl's could read a crafted authority differently,
    libcurl is handed only what was checked: scheme, host, port, path and query."""
    from urllib.parse import urlsplit

    from shared.images.http import _rebuilt

    parts = urlsplit("HTTP://[::1]:8080/a/b.png?v=2#fragment")
    assert _rebuilt("http", "::1", 8080, parts) == "http://[::1]:8080/a/b.png?v=2"
    assert _rebuilt("https", "cdn.example", 443, urlsplit("https://cdn.example")) == (
        "https://cdn.example:443/")
    reader = reader_for(tmp_path)
    assert reader.read(image_server.url("files/ok.png?v=3#part")).startswith(b"\x89PNG")


def test_a_forked_process_opens_its_own_connections(image_server, tmp_path):
    """DataLoader workers fork with the forking thread's handle in its locals: the child
    must not speak on the parent's sockets, and the parent goes on reading."""
    import multiprocessing

    reader = reader_for(tmp_path)
    url = image_server.url("files/ok.png")
    first = reader.read(url)
    parent = reader.http._handles.held[1]
    results = multiprocessing.get_context("fork").Queue()

    def child() -> None:
        same = reader.read(url) == first
        results.put((same, reader.http._handles.held[1] is parent))

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(30)
    assert results.get(timeout=5) == (True, False)  # read, on a handle of its own
    assert reader.read(url) == first and reader.http._handles.held[1] is parent


def test_truncated_and_garbled_responses_are_transient_and_the_reader_goes_on(image_server,
                                                                            tmp_path):
    reader = reader_for(tmp_path, image_fetch_attempts=1)
    with pytest.raises(Unavailable, match="curl error 18"):  # fewer bytes than announced
        reader.read(image_server.url("truncated/ok.png"))
    other = reader_for(tmp_path, image_fetch_attempts=1)  # the first host's backoff aside
    with pytest.raises(Unavailable, match="curl error"):  # no HTTP status line at all
        other.read(image_server.url("garbage"))
    assert reader_for(tmp_path).open(image_server.url("files/ok.png")).size == (64, 48)
