"""``milvus-server`` (the wrapper in the PyPI package milvus==2.3.5) with SO_REUSEADDR on the port probes it makes
before it starts the server. Run by scripts/milvus_server.sh with the .milvus-venv's Python, never facedb's.

The wrapper checks each port by binding it without SO_REUSEADDR, so a port that a server stopped moments ago left
connections on in TIME_WAIT counts as taken: a port given on the command line is then an error ("bind failed"), a
default one is moved to the next free one, and a restart had to wait those connections out (60 s on Linux; the
fault drill's three restarts waited ~70 s each). The server itself (Go, etcd) binds with SO_REUSEADDR, as servers
do: with it here too, a port in TIME_WAIT is free again at once, and one another process listens on is still
refused (Linux never lets two sockets listen on one address).
"""

from __future__ import annotations

import socket
import sys

import milvus


def try_bind_port(self: milvus.MilvusServerConfig, port: int) -> socket.socket | None:
    """The wrapper's probe (a listening socket on 127.0.0.1:port, or None), with SO_REUSEADDR."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except (OSError, OverflowError, ValueError):
        sock.close()
        return None


milvus.MilvusServerConfig.try_bind_port = try_bind_port

if __name__ == "__main__":
    sys.argv[0] = "milvus-server"
    sys.exit(milvus.main())
