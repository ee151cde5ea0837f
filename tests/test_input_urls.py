"""Input image URLs: only the caller's uploads and public https images get through."""

from __future__ import annotations

import pytest

from services.common.settings import Settings
from services.common.urls import (
    RefusedUrl,
    check_public,
    literal_address,
    own_storage_key,
    upload_key,
    user_prefix,
)

SETTINGS = Settings(
    FLUXPIPE_PUBLIC_URL="http://127.0.0.1:8080", FLUXPIPE_TRUSTED_IMAGE_HOSTS="images.test:9000"
)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://127.0.0.1/a.png", "loopback"),
        ("https://127.1/a.png", "loopback"),
        ("https://2130706433/a.png", "loopback"),
        ("https://0x7f000001/a.png", "loopback"),
        ("https://0x7f.0.0.1/a.png", "loopback"),
        ("https://0177.0.0.1/a.png", "loopback"),
        ("https://[::1]/a.png", "loopback"),
        ("https://[::ffff:127.0.0.1]/a.png", "loopback"),
        ("https://[::ffff:7f00:1]/a.png", "loopback"),
        ("https://10.0.0.5/a.png", "private"),
        ("https://172.16.3.4/a.png", "private"),
        ("https://192.168.1.1/a.png", "private"),
        ("https://3232235777/a.png", "private"),
        ("https://[fd00::1]/a.png", "private"),
        ("https://[2002:c0a8:0101::]/a.png", "private"),
        ("https://169.254.10.10/a.png", "link-local"),
        ("https://[fe80::1]/a.png", "link-local"),
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("https://0xa9fea9fe/latest/meta-data/", "metadata"),
        ("https://2852039166/latest/meta-data/", "metadata"),
        ("https://[::ffff:169.254.169.254]/", "metadata"),
        ("https://[fd00:ec2::254]/", "metadata"),
        ("https://100.100.100.200/", "metadata"),
        ("https://metadata.google.internal/computeMetadata/v1/", "metadata host"),
        ("https://224.0.0.1/a.png", "multicast"),
        ("https://[ff02::1]/a.png", "multicast"),
        ("https://240.0.0.1/a.png", "reserved"),
        ("https://0.0.0.0/a.png", "unspecified"),
        ("https://100.64.0.1/a.png", "not a public address"),
        ("https://[64:ff9b::a00:1]/a.png", "private"),
        ("https://localhost/a.png", "resolves to"),
        ("https://localhost./a.png", "resolv"),
        ("http://93.184.215.14/a.png", "only https"),
        ("file:///etc/passwd", "host"),
        ("ftp://93.184.215.14/a.png", "only https"),
        ("gopher://93.184.215.14:70/", "only https"),
        ("data:image/png;base64,iVBORw0KGgo=", "host"),
        ("https://user:pw@93.184.215.14/a.png", "user name"),
        ("https://no-such-host.invalid/a.png", "could not be resolved"),
        ("https:///a.png", "host"),
    ],
)
async def test_urls_that_are_not_public_https_are_refused(url, reason):
    with pytest.raises(RefusedUrl, match=reason):
        await check_public(url, SETTINGS)


async def test_public_https_addresses_and_trusted_hosts_pass():
    await check_public("https://93.184.215.14/a.png", SETTINGS)
    await check_public("https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/a.png", SETTINGS)
    await check_public("http://images.test:9000/a.png", SETTINGS)  # trusted: exempt, never resolved
    with pytest.raises(RefusedUrl, match="scheme"):
        await check_public("ftp://images.test:9000/a.png", SETTINGS)


def test_every_spelling_of_an_address_is_read_as_that_address():
    spellings = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0x7f.1", "127.0.0.1."]
    assert {str(literal_address(s)) for s in spellings} == {"127.0.0.1"}
    assert literal_address("example.com") is None and literal_address("deadbeef") is None


def test_own_uploads_live_under_a_per_user_prefix_of_our_storage():
    key = upload_key("alice", "flux_input_" + "a" * 32 + ".png")
    assert key == f"uploads/{user_prefix('alice')}/flux_input_{'a' * 32}.png"
    assert user_prefix("alice") != user_prefix("bob") and len(user_prefix("a/../b")) == 20
    assert own_storage_key(f"http://127.0.0.1:8080/files/{key}", SETTINGS) == key
    assert own_storage_key(f"http://127.0.0.1:9999/files/{key}", SETTINGS) is None
