"""`milvus-server` (the PyPI package milvus) with one change: its port check allows TIME_WAIT.

Before it starts the binary, the wrapper test-binds each port without SO_REUSEADDR and, if
that fails, silently takes the next free one. For a minute after a Milvus stopped, the
connections its clients had keep its proxy port in TIME_WAIT, so a restart on the same port
listened on 19531 instead and nobody found it. The binary (Go) binds with SO_REUSEADDR too,
which takes a port in TIME_WAIT but never one that something listens on.

    python services/dev/milvus_server.py --data DIR --proxy-port PORT
"""

from __future__ import annotations

import socket
import sys

import milvus


def try_bind_port(_config, port: int) -> socket.socket | None:
    """`MilvusServerConfig.try_bind_port`, with SO_REUSEADDR."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        return None
    return sock


if __name__ == "__main__":
    milvus.MilvusServerConfig.try_bind_port = try_bind_port
    sys.exit(milvus.main())
