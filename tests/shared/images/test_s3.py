"""s3:// image_uris through s3fs against moto's standalone S3 server on loopback. moto is an
emulator of the S3 protocol, not S3: it shows the client side (ranged reads, errors, the
bucket policy) works; latency and consistency are AWS's own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from shared.images import REFUSED, ImageError, ImageReader, NotFound, TooLarge, Unavailable
from shared.settings import Settings
from tests.bombs import png_bomb
from tests.conftest import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint URL, the server process) with bucket `images` holding a few objects."""
    import boto3

    port = free_port()
    binary = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise
                time.sleep(0.1)
        client.create_bucket(Bucket="images")
        client.create_bucket(Bucket="private")
        work = tmp_path_factory.mktemp("s3")
        Image.new("RGB", (50, 40), (1, 2, 3)).save(work / "ok.png")
        for key, path in (("p/ok.png", work / "ok.png"), ("p/bomb.png", png_bomb(work / "b")),
                          ("other/ok.png", work / "ok.png")):
            client.upload_file(str(path), "images", key)
        client.upload_file(str(work / "ok.png"), "private", "p/ok.png")
        client.put_object(Bucket="images", Key="p/big.bin", Body=b"\0" * 1_500_000)
        yield endpoint, proc
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def reader(s3, tmp_path, monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return ImageReader.from_settings(Settings(
        data_dir=tmp_path, image_buckets="s3://images/p", image_s3_endpoint_url=s3[0],
        image_cache_bytes=0, image_max_bytes=1_000_000, image_fetch_attempts=1,
        image_connect_timeout_s=1, image_read_timeout_s=2))


def reason(reader: ImageReader, uri: str) -> str:
    try:
        reader.read(uri)
    except ImageError as error:
        return error.reason
    return "read"


def test_objects_in_an_allowed_bucket_read_and_decode(reader):
    assert reader.open("s3://images/p/ok.png", 16).size == (50, 40)
    with pytest.raises(NotFound):
        reader.read("s3://images/p/missing.png")
    with pytest.raises(TooLarge):  # one ranged GET of max + 1 bytes: never more is read
        reader.read("s3://images/p/big.bin")
    with pytest.raises(ImageError, match="too many pixels"):
        reader.open("s3://images/p/bomb.png", 64)


def test_buckets_and_prefixes_outside_the_policy_are_refused(reader):
    for uri in ("s3://private/p/ok.png", "s3://images/other/ok.png",  # exists, not allowed
                "s3://images/p/../other/ok.png", "s3://images/p/./ok.png",
                "simplecache::s3://images/p/ok.png", "s3://images/", "s3://",
                "gs://images/p/ok.png", "memory://images/p/ok.png"):
        assert reason(reader, uri) == REFUSED, uri


def test_a_store_that_does_not_answer_is_transient(reader, s3):
    assert reason(reader, "s3://images/p/ok.png") == "read"
    stopped = ImageReader.from_settings(Settings(
        data_dir=reader.policy.data_dir, image_buckets="s3://images/p",
        image_s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        image_cache_bytes=0, image_fetch_attempts=1, image_connect_timeout_s=1))
    with pytest.raises(Unavailable):
        stopped.read("s3://images/p/ok.png")
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
