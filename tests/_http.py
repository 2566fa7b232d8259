"""A minimal HTTP/1.1 client for tests on trio: one request per connection, h11 for the protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h11
import msgspec
import trio


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


async def request(
    address: str,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Response:
    """Send one request to ``address`` (``"host:port"``) and read the whole answer."""
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        hdrs = [("host", address), ("connection", "close"), *(headers or {}).items()]
        if body or method in ("POST", "PUT"):
            hdrs.append(("content-length", str(len(body))))
        data = conn.send(h11.Request(method=method, target=path, headers=hdrs))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        status = 0
        response_headers: dict[str, str] = {}
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        return Response(status, response_headers, b"".join(chunks))


async def get(address: str, path: str, **kwargs: Any) -> Response:
    return await request(address, "GET", path, **kwargs)
