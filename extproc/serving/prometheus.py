"""The Prometheus port both servers serve (`prometheus_client.start_http_server`), and its
prompt close.

The client library serves from a thread running `serve_forever()`, which looks at its stop flag
only between `select()` calls of half a second; `shutdown()` waits for that, on the event loop
that called it. Shutting the listening socket first wakes the `select()` at once: every stop of
a picker or collector (and every test that starts one) was half a second longer without it.
"""

from __future__ import annotations

import contextlib
import socket
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


def serve_metrics(port: int, host: str, registry: CollectorRegistry) -> WSGIServer:
    """`/metrics` for `registry` on host:port (0: any free port; `server_port` says which)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


def close_metrics(server: WSGIServer) -> None:
    """Stop serving and close the port, without waiting out the serving thread's poll."""
    # A shut listening socket reads as ready: the thread's accept() fails (ignored by
    # socketserver), and it sees the stop flag on the next turn of its loop. A kernel that
    # refuses shutdown() on a listener leaves the poll to run out, as before.
    with contextlib.suppress(OSError):
        server.socket.shutdown(socket.SHUT_RDWR)
    server.shutdown()
    server.server_close()
