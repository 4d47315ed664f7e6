"""`continuum serve --workers N` hands uvicorn's worker processes a listening socket declared as
TCP, so that asyncio turns Nagle's algorithm off on every accepted connection (without it a
keep-alive response's body waited ~40 ms for the client's delayed ACK)."""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from continuum.entrypoints.serve_cli import tcp_listener


def _nodelay_of_accepted(listener: socket.socket) -> int:
    """TCP_NODELAY on a connection that an asyncio server accepted from `listener`."""

    async def main() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        host, port = listener.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        try:
            return await asyncio.wait_for(seen, timeout=10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    # A thread of its own: another test (Playwright's sync API) may have left an event loop
    # running in this one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(main())).result(timeout=30)


def _bound() -> socket.socket:
    sock = socket.socket(family=socket.AF_INET)  # as uvicorn's Config.bind_socket makes it
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_uvicorns_own_listening_socket_leaves_nagle_on() -> None:
    sock = _bound()
    assert sock.proto == 0
    assert _nodelay_of_accepted(sock) == 0  # what the fix is for


def test_the_tcp_listener_gets_nodelay_on_every_accepted_connection() -> None:
    original = _bound()
    address = original.getsockname()
    listener = tcp_listener(original)
    assert listener.proto == socket.IPPROTO_TCP
    assert listener.getsockname() == address  # the same bound socket, not a new one
    assert _nodelay_of_accepted(listener) != 0


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets here")
def test_a_unix_socket_is_left_as_it_is() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert tcp_listener(sock) is sock
    finally:
        sock.close()
