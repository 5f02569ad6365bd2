"""Image URL fetching against a real HTTP server on loopback (allowed explicitly)."""
from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from kimivl.v1 import types_pb2
from kimivl_contract.errors import RequestError
from kimivl_preprocess.sources import FetchPolicy, ImageFetcher, decode_data_uri

BODY = b"\x89PNG fake image body" * 100


@pytest.fixture
async def http_server():
    async def ok(_):
        return web.Response(body=BODY, content_type="image/png")

    async def big(_):
        resp = web.StreamResponse()  # no Content-Length: the limit must hold while streaming
        await resp.prepare(_)
        for _i in range(64):
            await resp.write(b"x" * 65536)
        return resp

    async def slow(_):
        await asyncio.sleep(5)
        return web.Response(body=BODY)

    async def hop(request):
        n = int(request.match_info["n"])
        raise web.HTTPFound("/ok" if n == 0 else f"/hop/{n - 1}")

    async def missing(_):
        return web.Response(status=404)

    app = web.Application()
    app.add_routes([web.get("/ok", ok), web.get("/big", big), web.get("/slow", slow), web.get("/hop/{n}", hop),
                    web.get("/missing", missing)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def fetch(url, **policy):
    f = ImageFetcher(FetchPolicy(allow_private=True, **policy))
    try:
        return await f.fetch(types_pb2.Image(url=url), "img")
    finally:
        await f.close()


async def test_fetches_and_follows_redirects_within_the_limit(http_server):
    assert await fetch(f"{http_server}/ok") == BODY
    assert await fetch(f"{http_server}/hop/2", max_redirects=3) == BODY


async def test_redirect_limit(http_server):
    with pytest.raises(RequestError, match="more than 2 redirects"):
        await fetch(f"{http_server}/hop/5", max_redirects=2)


async def test_byte_limit_while_streaming(http_server):
    with pytest.raises(RequestError, match="over the limit of 1048576 bytes") as e:
        await fetch(f"{http_server}/big", max_image_bytes=1 << 20)
    assert e.value.resource_exhausted


async def test_timeout(http_server):
    with pytest.raises(RequestError, match="no complete answer within 0.5 s"):
        await fetch(f"{http_server}/slow", timeout_s=0.5)


async def test_http_error_status(http_server):
    with pytest.raises(RequestError, match="HTTP 404"):
        await fetch(f"{http_server}/missing")


async def test_redirect_to_a_private_address_is_refused_when_not_allowed(http_server):
    # Even a public-looking start can't redirect inside: every hop is checked. Here the
    # first hop itself is loopback, so nothing is sent.
    f = ImageFetcher(FetchPolicy(allow_private=False))
    try:
        with pytest.raises(RequestError, match="non-public addresses"):
            await f.fetch(types_pb2.Image(url=f"{http_server}/hop/1"), "img")
    finally:
        await f.close()


def test_data_uri():
    assert decode_data_uri("data:image/png;base64,aGVsbG8=", "f", 100) == b"hello"
    with pytest.raises(RequestError, match="the limit is 3"):
        decode_data_uri("data:image/png;base64,aGVsbG8=", "f", 3)
    with pytest.raises(RequestError, match="invalid base64"):
        decode_data_uri("data:image/png;base64,a$b", "f", 100)
