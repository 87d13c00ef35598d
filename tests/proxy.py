"""A TCP proxy on 127.0.0.1 that can reset every connection through it, as a network might.

``reset()`` closes both ends of each connection with a TCP RST (``SO_LINGER`` 0): whatever
was in flight, in either direction, is gone, and both peers see the connection die.
``reset(swallow_s)`` first drops what the upstream side sends for that long, so that
something surely was in flight.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time

from tests.conftest import free_port


class ResettingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closing = False
        self._swallow_until = 0.0
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def reset(self, swallow_s: float = 0.0) -> None:
        if swallow_s > 0:
            self._swallow_until = time.monotonic() + swallow_s
            time.sleep(swallow_s)  # the data it drops is what this simulates losing
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _abort(sock)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() would not
        self._listener.close()
        self.reset()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _abort(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peer = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            for sock in peer:
                selector.register(sock, selectors.EVENT_READ)
            try:
                while not self._closing:
                    for key, _ in selector.select(timeout=0.1):
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        if key.fileobj is upstream and time.monotonic() < self._swallow_until:
                            continue  # lost on the way
                        peer[key.fileobj].sendall(data)  # type: ignore[index]
            except (OSError, ValueError):
                return  # reset (or closed) under us
            finally:
                with self._lock:
                    if (client, upstream) in self._pairs:
                        self._pairs.remove((client, upstream))
                _abort(client)
                _abort(upstream)


def _abort(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
