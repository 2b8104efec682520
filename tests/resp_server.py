"""A "Redis" on loopback that answers every command with one chosen error reply.

Real redis-py clients (the gateway's own `make_redis`) talk RESP3 to it, so a test sees exactly
what the gateway sees when a server answers MOVED, READONLY, LOADING, OOM, NOAUTH... without
building a cluster, a failover or a full memory. The handshake (HELLO, CLIENT ...) succeeds, so
the error arrives on the command; `on_connect=True` sends it at accept instead, as a server at
maxclients does.
"""
from __future__ import annotations

import socket
import threading


class ErrorRedis:
    def __init__(self, reply: str, on_connect: bool = False):
        self.reply = reply
        self.on_connect = on_connect
        self.commands: list[str] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"redis://127.0.0.1:{self._sock.getsockname()[1]}/0"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self._converse(conn)
        except OSError:
            pass  # the client hung up (redis-py drops a connection after a ConnectionError)
        finally:
            conn.close()

    def _converse(self, conn):
        if self.on_connect:
            conn.sendall(f"-{self.reply}\r\n".encode())
            return
        reader = conn.makefile("rb")
        while True:
            command = _read_command(reader)
            if command is None:
                return
            self.commands.append(command[0].upper())
            conn.sendall(self._answer(command))

    def _answer(self, command: list[str]) -> bytes:
        name = command[0].upper()
        if name == "HELLO":
            return b"%3\r\n+server\r\n+redis\r\n+version\r\n+7.0.0\r\n+proto\r\n:3\r\n"
        if name in ("CLIENT", "SELECT"):
            return b"+OK\r\n"
        return f"-{self.reply}\r\n".encode()

    def close(self):
        self._closed = True
        self._sock.close()


def _read_command(reader) -> list[str] | None:
    """One RESP array of bulk strings (what redis-py sends), or None at EOF."""
    head = reader.readline()
    if not head:
        return None
    count = int(head[1:])
    parts = []
    for _ in range(count):
        size = int(reader.readline()[1:])
        parts.append(reader.read(size + 2)[:-2].decode())
    return parts
