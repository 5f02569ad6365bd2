"""SSRF: image URLs reach public addresses only, and the address checked is the one connected to.

The fetcher runs with its default policy (no --allow-private-urls) against a real DNS server
(dnslib) and real HTTP servers on loopback. To have something "public" to connect to on one
machine, a few tests widen the policy to let 127.0.0.2 through, and nothing else: the
resolver path, the connection and the redirects stay the production code.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from dnslib import AAAA, QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer

from kimivl.v1 import types_pb2
from kimivl_contract.errors import RequestError
from kimivl_preprocess import url_policy
from kimivl_preprocess.sources import FetchPolicy, ImageFetcher

PUBLIC_FOR_TESTS = "127.0.0.2"  # stands in for a public host


@pytest.mark.parametrize("ip", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "100.100.100.200", "0.0.0.0", "255.255.255.255", "224.0.0.1", "198.18.0.1", "192.0.2.1", "240.0.0.1",
    "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "ff0e::1",
    "2001:db8::1", "2001::1", "64:ff9b:1::1",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::10.0.0.1", "::8.8.8.8",
    "2002:a00:1::", "2002:7f00:1::", "2002:a9fe:a9fe::", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe",
])
def test_non_global_addresses_are_refused(ip):
    assert url_policy.refusal(ip) is not None


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2001:4860:4860::8888",
                                "::ffff:8.8.8.8", "2002:808:808::", "64:ff9b::808:808"])
def test_public_addresses_pass(ip):
    assert url_policy.refusal(ip) is None


def test_wrapped_ipv4_is_named():
    assert "10.0.0.1" in url_policy.refusal("2002:a00:1::") and "6to4" in url_policy.refusal("2002:a00:1::")
    assert "NAT64" in url_policy.refusal("64:ff9b::a00:1")
    assert "shared" in url_policy.refusal("100.64.0.1")


async def _fetch(url, resolver=None, refusal=url_policy.refusal, **policy):
    f = ImageFetcher(FetchPolicy(**policy), resolver=resolver, refusal=refusal)
    try:
        return await f.fetch(types_pb2.Image(url=url), "img")
    finally:
        await f.close()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/a.png", "http://100.64.0.1/latest", "http://[::1]:9/a", "http://[2002:a00:1::]/a",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data", "http://[fec0::1]/a", "http://[::ffff:10.0.0.1]/a",
    "http://[::10.0.0.1]/a", "http://[fe80::1%25lo]/a", "http://0.0.0.0:9/a",
])
async def test_literal_addresses_are_refused_before_any_traffic(url):
    with pytest.raises(RequestError, match="non-public addresses"):
        await _fetch(url)


@pytest.mark.parametrize("url", ["http://localhost:9/a", "http://0x7f.1:9/a", "http://2130706433:9/a",
                                 "http://127.1:9/a"])
async def test_names_and_legacy_numeric_forms_of_loopback_are_refused(url):
    with pytest.raises(RequestError) as e:
        await _fetch(url)
    assert "non-public" in str(e.value) or "non-canonical IPv4 form" in str(e.value), e.value


class _Zone(BaseResolver):
    """A DNS zone whose answers can change from one query to the next (a rebinding attacker)."""

    def __init__(self):
        self.records: dict[str, list[list[str]]] = {}  # name -> answer sets, used in turn, the last repeats
        self.queries: dict[str, int] = {}
        self.lock = threading.Lock()

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries[name] = self.queries.get(name, 0) + 1
            sets = self.records.get(name, [[]])
            answers = sets.pop(0) if len(sets) > 1 else sets[0]
        for ip in answers:
            if ":" in ip and qtype == "AAAA":
                reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(ipaddress.IPv6Address(ip).exploded), ttl=0))
            elif ":" not in ip and qtype == "A":
                reply.add_answer(RR(name, QTYPE.A, rdata=A(ip), ttl=0))
        return reply


class _DnsResolver(AbstractResolver):
    """aiohttp's resolver interface over real DNS queries to the test's server."""

    def __init__(self, port: int):
        self.port = port

    async def resolve(self, host, port=0, family=socket.AF_INET):
        out = []
        for qtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            if family not in (0, fam):
                continue
            raw = await asyncio.to_thread(DNSRecord.question(host, qtype).send, "127.0.0.1", self.port, timeout=2)
            for rr in DNSRecord.parse(raw).rr:
                out.append({"hostname": host, "host": str(rr.rdata), "port": port, "family": fam, "proto": 0,
                            "flags": socket.AI_NUMERICHOST})
        if not out:
            raise OSError(f"{host} does not resolve")
        return out

    async def close(self):
        pass


@pytest.fixture(scope="module")
def dns():
    zone = _Zone()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = DNSServer(zone, address="127.0.0.1", port=port)
    server.start_thread()
    yield zone, _DnsResolver(port)
    server.stop()


@pytest.fixture
async def two_hosts():
    """The same port on 127.0.0.2 (the 'public' host) and 127.0.0.1 (private); each records its hits."""
    hits = {"public": 0, "private": 0}

    def app(label):
        async def image(request):
            hits[label] += 1
            return web.Response(body=label.encode(), content_type="image/png")

        async def redirect(request):
            hits[label] += 1
            raise web.HTTPFound(request.query["to"])

        a = web.Application()
        a.add_routes([web.get("/img", image), web.get("/redirect", redirect)])
        return a

    runners = []
    for _attempt in range(20):
        r1 = web.AppRunner(app("public"))
        await r1.setup()
        site = web.TCPSite(r1, PUBLIC_FOR_TESTS, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        r2 = web.AppRunner(app("private"))
        await r2.setup()
        try:
            await web.TCPSite(r2, "127.0.0.1", port).start()
        except OSError:
            await r1.cleanup()
            await r2.cleanup()
            continue
        runners = [r1, r2]
        break
    assert runners, "no port free on both addresses"
    yield port, hits
    for r in runners:
        await r.cleanup()


def _widened(ip: str) -> str | None:
    return None if ip == PUBLIC_FOR_TESTS else url_policy.refusal(ip)


@pytest.mark.parametrize("answer", ["127.0.0.1", "100.64.0.1", "10.0.0.1", "169.254.169.254", "fd00::1",
                                    "2002:a00:1::", "64:ff9b::a00:1", "::ffff:10.0.0.1", "fec0::1"])
async def test_names_resolving_to_non_public_addresses_are_refused(dns, answer):
    zone, resolver = dns
    name = f"n{abs(hash(answer))}.test"
    zone.records[name] = [[answer]]
    with pytest.raises(RequestError, match="resolves only to non-public addresses"):
        await _fetch(f"http://{name}:9/img", resolver)


async def test_a_rebinding_name_is_resolved_once_and_the_checked_address_is_used(dns, two_hosts):
    zone, resolver = dns
    port, hits = two_hosts
    # First answer public, every later one private: a second lookup would land on 127.0.0.1.
    zone.records["rebind.test"] = [[PUBLIC_FOR_TESTS], ["127.0.0.1"]]
    zone.queries.clear()
    assert await _fetch(f"http://rebind.test:{port}/img", resolver, _widened) == b"public"
    assert hits == {"public": 1, "private": 0}
    assert zone.queries["rebind.test"] <= 2  # one lookup: an A and an AAAA query


async def test_mixed_answers_connect_only_to_the_allowed_address(dns, two_hosts):
    zone, resolver = dns
    port, hits = two_hosts
    zone.records["mixed.test"] = [["127.0.0.1", PUBLIC_FOR_TESTS]]
    for _ in range(3):
        assert await _fetch(f"http://mixed.test:{port}/img", resolver, _widened) == b"public"
    assert hits["private"] == 0


@pytest.mark.parametrize("target", ["http://inside.test:{port}/img", "http://127.0.0.1:{port}/img",
                                    "http://[::ffff:127.0.0.1]:{port}/img"])
async def test_a_redirect_into_the_private_network_is_refused(dns, two_hosts, target):
    zone, resolver = dns
    port, hits = two_hosts
    zone.records["outside.test"] = [[PUBLIC_FOR_TESTS]]
    zone.records["inside.test"] = [["127.0.0.1"]]
    url = f"http://outside.test:{port}/redirect?to=" + target.format(port=port)
    with pytest.raises(RequestError, match="non-public addresses"):
        await _fetch(url, resolver, _widened)
    assert hits == {"public": 1, "private": 0}


async def test_without_the_widened_policy_the_stand_in_is_refused_too(dns, two_hosts):
    zone, resolver = dns
    port, hits = two_hosts
    zone.records["plain.test"] = [[PUBLIC_FOR_TESTS]]
    with pytest.raises(RequestError, match="resolves only to non-public addresses"):
        await _fetch(f"http://plain.test:{port}/img", resolver)
    assert hits == {"public": 0, "private": 0}
