"""Which addresses image URLs may reach: public (globally routable) unicast only.

The front door fetches URLs its callers name, from inside the cluster: without a policy a
caller could read cloud metadata (169.254.169.254, or 100.100.100.200 in 100.64.0.0/10),
internal services or the host itself. Refused, unless ``--allow-private-urls``:

* every address ``ipaddress`` does not call global (private, loopback, link-local, shared
  100.64.0.0/10, benchmarking, documentation, reserved, unspecified, …), and multicast;
* IPv6 forms that carry an IPv4 address are judged by that address: IPv4-mapped
  (``::ffff:a.b.c.d``), NAT64 (``64:ff9b::/96``) and 6to4 (``2002::/16``), so
  ``2002:a00:1::`` is 10.0.0.1; the deprecated IPv4-compatible ``::/96``, local-use NAT64
  ``64:ff9b:1::/48``, Teredo ``2001::/32`` and site-local ``fec0::/10`` are refused outright.
"""
from __future__ import annotations

import ipaddress

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_COMPATIBLE = ipaddress.ip_network("::/96")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")


def refusal(ip: str) -> str | None:
    """Why ``ip`` (an address literal, IPv6 zone allowed) may not be fetched from; None if it may."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "not an IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return "a scoped (zone) IPv6 address"
        if addr.is_loopback or addr.is_unspecified:
            return _article(_kind(addr)) + " address"
        if addr.ipv4_mapped is not None:
            return _wrapped(addr.ipv4_mapped, "IPv4-mapped")
        if addr in _COMPATIBLE:
            return "an IPv4-compatible or unspecified IPv6 address"
        if addr in _NAT64:
            return _wrapped(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "NAT64")
        if addr in _LOCAL_NAT64:
            return "a local-use NAT64 address"
        if addr.sixtofour is not None:
            return _wrapped(addr.sixtofour, "6to4")
        if addr.teredo is not None:
            return "a Teredo address"
        if addr in _SITE_LOCAL:
            return "a site-local address"
    if addr.is_multicast:
        return "a multicast address"
    if not addr.is_global:
        return _article(_kind(addr)) + " address"
    return None


def _wrapped(v4: ipaddress.IPv4Address, form: str) -> str | None:
    why = refusal(str(v4))
    return None if why is None else f"{form}, wrapping {v4}: {why}"


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _kind(addr) -> str:
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_unspecified:
        return "unspecified"
    if isinstance(addr, ipaddress.IPv4Address) and addr in ipaddress.ip_network("100.64.0.0/10"):
        return "shared (carrier-grade NAT)"
    if addr.is_private:
        return "private"
    if addr.is_reserved:
        return "reserved"
    return "non-public"


def is_public(ip: str) -> bool:
    return refusal(ip) is None
