"""ZeroMQ only: the master's ROUTER, the worker's DEALER, CURVE and the ZAP handler.

Nothing here knows about jobs or leases; the master and the worker hand it frames.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Iterator

import zmq
from zmq.utils import z85

from .errors import SecurityError, UsageError
from .security import Keys

logger = logging.getLogger(__name__)

# Worker frames are small by schema; anything larger is an attack or a bug, and libzmq drops
# the connection that sent it.
MASTER_MAX_MSG_BYTES = 8 * 1024 * 1024
HANDSHAKE_IVL_MS = 5_000
RECV_BATCH = 2_000
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _is_ipv6(address: str) -> bool:
    # Only for IPv6 literals: with the option on, IPv4 endpoints read back as ::ffff:a.b.c.d.
    return "[" in address


class ZapHandler(threading.Thread):
    """Accept CURVE clients whose public key is the worker key derived from the secret."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], worker_public: bytes) -> None:
        super().__init__(name="taskmaster-zap", daemon=True)
        self._allowed = worker_public
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)
        self.denied = 0

    def run(self) -> None:
        sock = self._socket
        while True:
            try:
                frames = sock.recv_multipart()
            except zmq.ZMQError:  # ContextTerminated included: the master is closing
                break
            if len(frames) < 6:  # libzmq never sends this; REP must still answer
                frames = [b"1.0", frames[1] if len(frames) > 1 else b"", b"", b"", b"", b""]
            version, request_id, _domain, address, _identity, mechanism = frames[:6]
            ok = self.allows(mechanism, frames[6:])
            if not ok:
                self.denied += 1
                if self.denied <= 10 or self.denied % 1000 == 0:
                    logger.warning(
                        "refused connection from=%s: wrong secret (%d so far)",
                        address.decode(errors="replace"),
                        self.denied,
                    )
            status = (b"200", b"OK") if ok else (b"400", b"denied")
            try:
                sock.send_multipart([version, request_id, *status, b"", b""])
            except zmq.ZMQError:
                break
        sock.close(0)

    def allows(self, mechanism: bytes, credentials: list[bytes]) -> bool:
        """Whether a ZAP request carries the worker key (CURVE only, nothing else)."""
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return False
        # A plain comparison: a public key is no secret to leak through timing, and the CURVE
        # handshake has already proven that the peer holds its secret half. (hmac's
        # compare_digest would load OpenSSL into every master, 2-3 ms of start-up.)
        return z85.encode(credentials[0]) == self._allowed


def _monitor_events(monitor: zmq.Socket[bytes]) -> Iterator[int]:
    """The events waiting on a monitor socket, without blocking.

    Parsed by hand: ``zmq.utils.monitor`` imports asyncio, 20 ms in every fresh worker.
    """
    while True:
        try:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        yield int.from_bytes(frames[0][:2], "little")


class MasterTransport:
    """A bound ROUTER socket with CURVE server keys, plus a wake-up pipe for other threads."""

    def __init__(self, address: str, keys: Keys) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 1000
        self._secure(sock, keys)
        sock.setsockopt(zmq.MAXMSGSIZE, MASTER_MAX_MSG_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A worker whose connection broke reconnects under the same identity, possibly before
        # this side has seen the old connection die (a vanished NAT entry, a pulled cable):
        # it takes its identity over at once, rather than being refused until TCP gives up.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        sock.sndhwm = 0
        sock.rcvhwm = 0
        sock.ipv6 = _is_ipv6(address)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            self.context.term()
            hint = " (is another master running there?)" if exc.errno == errno.EADDRINUSE else ""
            raise UsageError(f"cannot listen on {address}: {exc.strerror}{hint}") from exc
        self.socket = sock
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        # A worker process that dies closes its TCP connection at once; counting disconnects
        # lets the master probe its workers instead of waiting out the liveness window.
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.disconnects = 0
        self.failed_handshakes = 0
        self._failed_unclosed = 0
        self.unroutable = 0

    def _secure(self, sock: zmq.Socket[bytes], keys: Keys) -> None:
        # Before bind: no peer may ever reach this socket without CURVE and the ZAP check.
        self.zap: ZapHandler | None = ZapHandler(self.context, keys.worker_public)
        self.zap.start()
        sock.curve_server = True
        sock.curve_secretkey = keys.master_secret
        sock.curve_publickey = keys.master_public
        sock.zap_domain = b"taskmaster"

    def wake(self) -> None:
        """Interrupt a poll from another thread (signal-safe and thread-safe)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def poll(self, timeout_s: float) -> None:
        """Block until a frame or a wake-up arrives, or the timeout passes."""
        events = dict(self._poller.poll(max(0, math.ceil(timeout_s * 1000))))
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._wake_r, 4096)
        if self._monitor in events:
            self._read_monitor()

    def _read_monitor(self) -> None:
        for event in _monitor_events(self._monitor):
            if event & _HANDSHAKE_FAILED:
                # Not a worker leaving: a peer without the secret (or not taskmaster at all).
                self.failed_handshakes += 1
                self._failed_unclosed += 1
                if self.failed_handshakes <= 10 or self.failed_handshakes % 1000 == 0:
                    logger.warning(
                        "refused a connection that failed the CURVE handshake: a worker "
                        "with another secret, or not a taskmaster worker (%d so far)",
                        self.failed_handshakes,
                    )
            elif self._failed_unclosed:
                self._failed_unclosed -= 1  # the hang-up that follows a failed handshake
            else:
                self.disconnects += 1

    def receive(self) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(worker identity, frame)`` for what is waiting now, without blocking."""
        recv = self.socket.recv_multipart
        for _ in range(RECV_BATCH):
            try:
                frames = recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) == 2:
                yield frames[0], frames[1]
            else:
                yield frames[0], b""  # wrong frame count: let the protocol layer reject it

    def send(self, identity: bytes, frame: bytes) -> bool:
        """Send to one worker; ``False`` when it is gone (never raises for that)."""
        try:
            self.socket.send_multipart((identity, frame), zmq.NOBLOCK, copy=len(frame) < 65536)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                self.unroutable += 1
                return False
            raise

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(0)
        self.socket.close()
        self.context.term()
        os.close(self._wake_r)
        os.close(self._wake_w)


class HandshakeFailed(SecurityError):
    """The master answered but would not complete the CURVE handshake: a different secret."""


class WorkerTransport:
    """A DEALER socket connected to the master, pinned to the master's public key.

    A monitor counts connections that never complete the handshake, so a wrong secret fails
    fast with a clear message instead of retrying silently until ``--wait`` runs out.
    """

    MAX_FAILED_HANDSHAKES = 3

    def __init__(self, address: str, keys: Keys, identity: bytes) -> None:
        self.address = address
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 2000
        sock.routing_id = identity
        self._secure(sock, keys)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.sndhwm = 0
        sock.rcvhwm = 0
        sock.ipv6 = _is_ipv6(address)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            raise UsageError(f"cannot connect to {address}: {exc.strerror}") from exc
        self.socket = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._pending_connect = False
        self.failed_handshakes = 0
        self.refused = False
        self.handshakes = 0
        self.connected_at: float | None = None
        # Established connections lost: what the master sent on one may never arrive.
        self.resets = 0

    @staticmethod
    def _secure(sock: zmq.Socket[bytes], keys: Keys) -> None:
        # Pinning the master's public key: only a master holding the secret can answer.
        sock.curve_serverkey = keys.master_public
        sock.curve_publickey = keys.worker_public
        sock.curve_secretkey = keys.worker_secret

    def register(self, fd: int) -> None:
        self._poller.register(fd, zmq.POLLIN)

    def poll(self, timeout_s: float) -> bool:
        """Wait for traffic; return whether a frame from the master is readable."""
        events = dict(self._poller.poll(max(0, math.ceil(timeout_s * 1000))))
        if self._monitor in events:
            self._read_monitor()
        return self.socket in events

    def _read_monitor(self) -> None:
        for event in _monitor_events(self._monitor):
            self._on_event(event)
        if self.refused or self.failed_handshakes >= self.MAX_FAILED_HANDSHAKES:
            raise HandshakeFailed(
                f"cannot authenticate with the master at {self.address} (CURVE handshake "
                f"failed {self.failed_handshakes} times): most likely this worker's secret is "
                "not the master's; use the same --secret-file or TM_SECRET on both sides "
                "(or, on one machine, start both in the same directory)"
            )

    def _on_event(self, event: int) -> None:
        if event == zmq.EVENT_CONNECTED:
            self._pending_connect = True
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._pending_connect = False
            self.failed_handshakes = 0
            self.handshakes += 1
            self.connected_at = time.monotonic()
        elif event == zmq.EVENT_DISCONNECTED:
            if self.connected_at is not None:
                self.resets += 1
            self.connected_at = None
            if self._pending_connect:
                self._pending_connect = False
                self._handshake_failed()
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            # The master (it holds the key we pinned) rejected our key through ZAP. libzmq does
            # not reconnect after that, so waiting for more failures would wait forever.
            self._pending_connect = False
            self.failed_handshakes += 1
            self.refused = True
        elif event & (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            # A master with another secret cannot decrypt our HELLO and hangs up: libzmq
            # reports that here, then reconnects, so a few in a row mean a wrong secret.
            self._pending_connect = False
            self._handshake_failed()

    def _handshake_failed(self) -> None:
        # Once a handshake with this master's key succeeded, the secret is right: a link that
        # drops connections mid-handshake is a bad network, left to --wait, not a reason to
        # give up at once saying the secret is wrong.
        if self.handshakes == 0:
            self.failed_handshakes += 1

    def receive(self) -> Iterator[bytes]:
        recv = self.socket.recv
        while True:
            try:
                yield recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return

    def send(self, frame: bytes) -> None:
        self.socket.send(frame, zmq.NOBLOCK, copy=len(frame) < 65536)

    def close(self, linger_s: float = 2.0) -> None:
        if self.connected_at is None and self.failed_handshakes:
            linger_s = 0.0  # what is queued can never be delivered: do not wait for it
        self.socket.disable_monitor()
        self._monitor.close(0)
        self.socket.close(int(linger_s * 1000))
        self.context.term()
