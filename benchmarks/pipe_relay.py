"""A bare byte pipe on uvloop: the floor of any relay written as tritonpilot's is.

It accepts connections on two ports and pipes each to its Triton port, byte for byte, with
the same event loop, the same asyncio Protocol callbacks, one upstream connection per client
connection and one `writelines` per read, as proxy/relay.py and proxy/http_relay.py do, but
reads nothing: no frames, no headers, no counts. bench-peers runs it as the peer
`uvloop-pipe`; the difference between its CPU per request and tritonpilot's is what
tritonpilot's parsing and counting cost, and its own CPU per request is what Python and
uvloop cost before any of that.

    python benchmarks/pipe_relay.py LISTEN_PORT:TRITON_PORT [LISTEN_PORT:TRITON_PORT ...]
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, port: int) -> None:
        self.port = port
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: _Upstream(self.transport), "127.0.0.1", self.port)
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        upstream.writelines(self.early)
        self.early = []

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def main(pairs: list[tuple[int, int]]) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    servers = [await loop.create_server(lambda p=upstream: _Client(p), "127.0.0.1", listen)
               for listen, upstream in pairs]
    await stop
    for server in servers:
        server.close()


if __name__ == "__main__":
    uvloop.run(main([(int(a), int(b)) for a, b in (arg.split(":") for arg in sys.argv[1:])]))
