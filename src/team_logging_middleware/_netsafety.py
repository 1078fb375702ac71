"""Where a tenant-chosen URL may point: the checks shared by every HTTP destination.

Team admins choose the host their logs are sent to (``langfuse_host``, an OTel endpoint, ...), so
the gateway must never become a way to reach the cloud metadata service or other link-local
addresses from inside the operator's network (SSRF). The check runs twice:

* when settings are written, on literal IP hosts (:func:`check_destination_url`), so the admin API
  refuses them with a clear message;
* when records are sent, on the addresses a hostname resolves to (:func:`safe_addresses`), because
  a harmless-looking name can resolve (or be re-pointed) to ``169.254.169.254`` at any time.
  Callers then connect to the checked address itself, so a second, different DNS answer
  (DNS rebinding) cannot slip in between the check and the connection.

Loopback and private ranges stay allowed: self-hosted collectors and Langfuse instances on the
operator's own network are the normal case.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from .errors import SettingsError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

BLOCKED_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    # AWS/GCP/Azure/OpenStack metadata (169.254.169.254) and the rest of IPv4 link-local.
    (ipaddress.ip_network("169.254.0.0/16"), "link-local / cloud metadata"),
    # AWS's IPv6 metadata endpoint on Nitro instances.
    (ipaddress.ip_network("fd00:ec2::254/128"), "cloud metadata"),
    # Alibaba Cloud's metadata service sits outside link-local.
    (ipaddress.ip_network("100.100.100.200/32"), "cloud metadata"),
    (ipaddress.ip_network("fe80::/10"), "link-local"),
)

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses``: how a hostname is turned into IP address strings."""


class UnsafeHostError(ValueError):
    """A destination host is, or resolves to, an address logs must never be sent to."""


def blocked_reason(address: str | IPAddress) -> str | None:
    """Why ``address`` must not receive logs, or None when it may.

    IPv4-mapped IPv6 addresses (``::ffff:169.254.169.254``) are checked as the IPv4 address they
    carry, since that is where the kernel actually connects.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for network, reason in BLOCKED_NETWORKS:
        if ip.version == network.version and ip in network:
            return reason
    return None


# Hosts made only of these characters may be an IPv4 address in one of the shorthand forms the
# C resolver accepts (inet_aton): "2852039166", "0xa9fea9fe", "0251.0376.0251.0376" and
# "169.254.43518" all connect to 169.254.169.254, yet none is an address to ``ipaddress``.
_NUMERIC_HOST = re.compile(r"^[0-9a-fA-FxX.]+$")


def literal_ip(host: str) -> IPAddress | None:
    """The IP address a URL host spells literally (``[::1]`` brackets allowed), else None.

    Shorthand IPv4 forms are read the way ``getaddrinfo`` reads them, so that a check made on the
    literal judges the address the connection would actually go to.
    """
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(candidate):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(candidate))
        except OSError:
            return None
    return None


def check_destination_url(url: str, *, param: str) -> str:
    """Validate a tenant-supplied base URL; return it without a trailing slash.

    Refuses: schemes other than http/https, a missing host, credentials in the URL (they would
    bypass secret masking), query strings and fragments, spaces, control characters and
    backslashes, and literal IPs (shorthand IPv4 forms included) in blocked ranges.
    Raises :class:`SettingsError` naming ``param``; the message never repeats the URL's userinfo.
    """
    stripped = url.strip()
    # urlsplit silently drops tabs and newlines, so the check would judge another URL than
    # the one stored; HTTP clients refuse such URLs (or, for a backslash, may read another
    # host out of it than urlsplit does).
    if any(ch <= " " or ch == "\x7f" or ch == "\\" for ch in stripped):
        raise SettingsError(
            f"{param}: the URL must not contain spaces, control characters or backslashes",
            param=param,
        )
    try:
        parts = urlsplit(stripped)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise SettingsError(f"{param}: not a valid URL", param=param) from None
    if parts.scheme not in ("http", "https"):
        raise SettingsError(f"{param}: the URL must start with http:// or https://", param=param)
    if parts.username is not None or parts.password is not None:
        raise SettingsError(
            f"{param}: credentials must not be part of the URL; use the dedicated key vars",
            param=param,
        )
    host = parts.hostname
    if not host:
        raise SettingsError(f"{param}: the URL has no host", param=param)
    if parts.query or parts.fragment:
        raise SettingsError(f"{param}: the URL must not have a query or fragment", param=param)
    if port == 0:
        raise SettingsError(f"{param}: port 0 is not a valid destination", param=param)
    ip = literal_ip(host)
    if ip is not None:
        reason = blocked_reason(ip)
        if reason is not None:
            raise SettingsError(
                f"{param}: {ip} is a {reason} address; logs cannot be sent there", param=param
            )
    return stripped.rstrip("/")


async def resolve_host(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the event loop's resolver (the system's, run off the loop)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def safe_addresses(host: str, port: int, *, resolver: Resolver = resolve_host) -> list[str]:
    """The addresses ``host`` resolves to, all checked; raises :class:`UnsafeHostError`.

    Every answer must be safe, not just the first: otherwise a DNS name answering with both a
    public and a metadata address could still win a connection to the latter. A literal IP is
    checked without a lookup. Resolution errors (``OSError``) propagate to the caller, which
    treats them as "unreachable for now".
    """
    ip = literal_ip(host)
    addresses = [str(ip)] if ip is not None else list(await resolver(host, port))
    if not addresses:
        raise OSError(f"{host} did not resolve to any address")
    for address in addresses:
        reason = blocked_reason(address.split("%", 1)[0])
        if reason is not None:
            raise UnsafeHostError(f"{host} resolves to a {reason} address; refusing to send")
    return addresses
