"""One shared secret → CURVE keys for both sides; where secrets come from; what a bind may be.

Both key pairs are derived from the secret with HMAC-SHA256 under fixed labels, so whoever holds
the secret can be a worker (the master's ZAP handler accepts exactly that public key) and can
recognise the master (workers pin its public key). No secret ever appears on a command line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import stat
from pathlib import Path
from typing import NamedTuple

from .errors import SecurityError, UsageError

logger = logging.getLogger(__name__)

SECRET_ENV = "TM_SECRET"
LOCAL_SECRET_PATH = Path(".taskmaster") / "secret"
DEFAULT_PORT = 3050
DEFAULT_ADDRESS = f"tcp://127.0.0.1:{DEFAULT_PORT}"
MIN_LIBZMQ = (4, 3, 2)
_MASTER_LABEL = b"taskmaster/v1/master-key"
_WORKER_LABEL = b"taskmaster/v1/worker-key"


class Keys(NamedTuple):
    """Z85-encoded CURVE keys derived from one secret."""

    master_public: bytes
    master_secret: bytes
    worker_public: bytes
    worker_secret: bytes


def generate_secret() -> str:
    """A fresh random 256-bit secret, as 64 hex digits (what ``tm secret`` prints)."""
    return os.urandom(32).hex()  # what secrets.token_hex does, without importing hmac


def fresh_keys() -> Keys:
    """Random key pairs for a run whose secret nobody else needs (``tm-run`` on loopback).

    Its workers are forked from the same process, so they take these keys as they are: no
    secret to derive them from, and no OpenSSL to load (``hmac`` costs 2-3 ms at start-up).
    """
    import zmq

    master_public, master_secret = zmq.curve_keypair()
    worker_public, worker_secret = zmq.curve_keypair()
    return Keys(master_public, master_secret, worker_public, worker_secret)


def _secret_bytes(secret: str) -> bytes:
    text = secret.strip()
    if len(text) < 32:
        raise SecurityError("the secret is too short: make one with `tm secret`")
    return text.encode()


def derive_keys(secret: str) -> Keys:
    """Both key pairs from the shared secret: HMAC-SHA256 of it under a fixed label each."""
    import hashlib  # with hmac, loads OpenSSL: only runs that share a secret pay for it
    import hmac

    import zmq
    from zmq.utils import z85

    raw = _secret_bytes(secret)
    master_secret = z85.encode(hmac.new(raw, _MASTER_LABEL, hashlib.sha256).digest())
    worker_secret = z85.encode(hmac.new(raw, _WORKER_LABEL, hashlib.sha256).digest())
    return Keys(
        master_public=zmq.curve_public(master_secret),
        master_secret=master_secret,
        worker_public=zmq.curve_public(worker_secret),
        worker_secret=worker_secret,
    )


def read_secret_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read secret file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "secret file %s can be read by group or others (mode %03o): chmod 600 %s",
            path,
            stat.S_IMODE(mode),
            path,
        )
    if not text:
        raise UsageError(f"secret file {path} is empty: write one with `tm secret > {path}`")
    return text


def configured_secret(secret_file: str | None) -> str | None:
    """The secret from ``--secret-file`` or ``$TM_SECRET``, if either is set."""
    if secret_file:
        return read_secret_file(Path(secret_file))
    env = os.environ.get(SECRET_ENV, "").strip()
    return env or None


def local_secret(directory: Path | None = None) -> str:
    """The loopback default: ``.taskmaster/secret``, created atomically by whoever comes first."""
    path = (directory or Path.cwd()) / LOCAL_SECRET_PATH
    if path.exists():
        return read_secret_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name no other process can be using (pids repeat across containers sharing a directory),
    # written in full before it becomes visible under the real name.
    tmp = path.with_name(f".secret.{os.getpid()}.{os.urandom(8).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (generate_secret() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another process got there first: then both use the winner's secret.
        os.link(tmp, path)
        logger.info("created a local secret in %s (mode 0600)", path)
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return read_secret_file(path)


def normalize_address(address: str) -> str:
    """Accept ``host:port`` and ``:port`` as well as ``tcp://host:port``; refuse a tcp
    address without a port, or with one outside 1-65535, saying so."""
    address = address.strip()
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "tcp":
        return address  # ipc://, inproc://: libzmq's to judge
    host, colon, port = (rest if sep else address).rpartition(":")
    valid = port == "*" if sep else False  # tcp://host:*, a free port (tm-run's own)
    valid = valid or (port.isdigit() and 0 < int(port) < 65536)
    if not colon or not valid or (sep and not host):
        raise UsageError(
            f"bad address {address!r}: use host:port or tcp://host:port, port 1 to 65535"
        )
    return f"tcp://{host or '127.0.0.1'}:{port}"


def address_host(address: str) -> str:
    rest = address.split("://", 1)[-1]
    host = rest.rpartition(":")[0]
    return host.strip("[]")


def is_loopback(address: str) -> bool:
    """Whether a tcp endpoint's host is on 127.0.0.0/8 or ::1 (names are resolved)."""
    host = address_host(address)
    if address.startswith(("ipc://", "inproc://")):
        return True
    if host in ("*", "", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    import socket  # only a host name needs it; keeping it off every start-up costs 2 ms

    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def master_secret(address: str, secret_file: str | None) -> str:
    """The secret a master uses for ``address``: configured, else the local one on loopback."""
    secret = configured_secret(secret_file)
    if secret is not None:
        return secret
    if not is_loopback(address):
        raise SecurityError(
            f"refusing to listen on {address} without a secret: run `tm secret > tm.secret`, "
            "copy the file to every machine, and pass --secret-file tm.secret "
            "(or set TM_SECRET) on the master and the workers"
        )
    return local_secret()


def worker_secret(address: str, secret_file: str | None) -> str:
    secret = configured_secret(secret_file)
    if secret is not None:
        return secret
    if not is_loopback(address):
        raise SecurityError(
            f"no secret for master {address}: pass --secret-file PATH (or set TM_SECRET) "
            "with the secret the master uses"
        )
    return local_secret()


def check_libzmq() -> None:
    """Refuse a libzmq too old for our socket options or built without CURVE."""
    import zmq

    version = zmq.zmq_version_info()
    if version < MIN_LIBZMQ:
        raise SecurityError(
            f"libzmq {zmq.zmq_version()} is too old: taskmaster needs 4.3.2 or newer "
            "(pip install --upgrade pyzmq brings a bundled one)"
        )
    if not zmq.has("curve"):
        raise SecurityError(
            "this libzmq has no CURVE support, so traffic cannot be encrypted: "
            "install pyzmq's wheel (pip install --force-reinstall pyzmq)"
        )
