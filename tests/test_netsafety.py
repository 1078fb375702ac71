"""Tenant-chosen destinations: no metadata or link-local address, literally or through DNS."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from team_logging_middleware._netsafety import (
    UnsafeHostError,
    blocked_reason,
    check_destination_url,
    literal_ip,
    resolve_host,
    safe_addresses,
)
from team_logging_middleware.errors import SettingsError


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.0.1",
        "fd00:ec2::254",
        "::ffff:169.254.169.254",
        "fe80::1",
        "100.100.100.200",
    ],
)
def test_metadata_and_link_local_addresses_are_blocked(address: str) -> None:
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.8", "192.168.1.2", "8.8.8.8", "::1"])
def test_ordinary_addresses_are_allowed(address: str) -> None:
    assert blocked_reason(address) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://cloud.langfuse.com", "https://cloud.langfuse.com"),
        ("http://localhost:3000/", "http://localhost:3000"),
        ("https://example.com/langfuse/", "https://example.com/langfuse"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_valid_urls_come_back_without_trailing_slash(url: str, expected: str) -> None:
    assert check_destination_url(url, param="p") == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("example.com", "http:// or https://"),
        ("http://", "no host"),
        ("http://169.254.169.254/latest", "link-local"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("https://example.com/?token=x", "query"),
        ("http://example.com:99999", "not a valid URL"),
    ],
)
def test_refused_urls_say_why(url: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        check_destination_url(url, param="callback_vars.langfuse_host")
    assert fragment in str(info.value)
    assert info.value.param == "callback_vars.langfuse_host"


def test_credentials_in_the_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(SettingsError) as info:
        check_destination_url("https://user:hunter2-secret@example.com", param="p")
    assert "hunter2-secret" not in str(info.value)


def test_literal_ip() -> None:
    assert str(literal_ip("[::1]")) == "::1"
    assert str(literal_ip("127.0.0.1")) == "127.0.0.1"
    assert literal_ip("example.com") is None


def _resolver(answers: Sequence[str], calls: list[str] | None = None):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return list(answers)

    return resolve


async def test_a_name_resolving_to_metadata_is_refused() -> None:
    with pytest.raises(UnsafeHostError, match="link-local"):
        await safe_addresses("metadata.local", 80, resolver=_resolver(["169.254.169.254"]))


async def test_one_bad_answer_among_good_ones_is_enough_to_refuse() -> None:
    with pytest.raises(UnsafeHostError):
        await safe_addresses("mixed.test", 443, resolver=_resolver(["8.8.8.8", "fd00:ec2::254"]))


async def test_safe_answers_are_returned_and_literals_skip_dns() -> None:
    calls: list[str] = []
    resolver = _resolver(["10.1.2.3"], calls)
    assert await safe_addresses("collector.internal", 4318, resolver=resolver) == ["10.1.2.3"]
    assert await safe_addresses("127.0.0.1", 80, resolver=resolver) == ["127.0.0.1"]
    assert calls == ["collector.internal"]
    with pytest.raises(UnsafeHostError):
        await safe_addresses("169.254.169.254", 80, resolver=resolver)


async def test_scoped_link_local_answer_is_refused() -> None:
    with pytest.raises(UnsafeHostError):
        await safe_addresses("scoped.test", 80, resolver=_resolver(["fe80::1%eth0"]))


async def test_no_answer_is_an_os_error() -> None:
    with pytest.raises(OSError):
        await safe_addresses("empty.test", 80, resolver=_resolver([]))


async def test_system_resolver_resolves_localhost() -> None:
    # localhost comes from the hosts file: no network needed.
    addresses = await resolve_host("localhost", 80)
    assert addresses and all(blocked_reason(a) is None for a in addresses)
