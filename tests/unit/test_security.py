"""Secrets, key derivation, addresses and the transport's security settings.

No tm processes here: in-process ZeroMQ sockets on 127.0.0.1, and a few forked processes for
the race on ``.taskmaster/secret``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from taskmaster import security
from taskmaster.errors import SecurityError, UsageError
from taskmaster.transport import (
    HANDSHAKE_IVL_MS,
    MASTER_MAX_MSG_BYTES,
    HandshakeFailed,
    MasterTransport,
    WorkerTransport,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(security.SECRET_ENV, raising=False)


# -- secrets and keys --------------------------------------------------------------------


def test_generated_secrets_are_256_random_bits() -> None:
    secrets = {security.generate_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert len(secret) == 64 and len(bytes.fromhex(secret)) == 32


def test_keys_are_hmac_sha256_of_the_secret_under_fixed_labels() -> None:
    secret = security.generate_secret()
    keys = security.derive_keys(secret)
    expected_master = hmac.new(secret.encode(), b"taskmaster/v1/master-key", hashlib.sha256)
    expected_worker = hmac.new(secret.encode(), b"taskmaster/v1/worker-key", hashlib.sha256)
    assert z85.decode(keys.master_secret) == expected_master.digest()
    assert z85.decode(keys.worker_secret) == expected_worker.digest()
    assert keys.master_public == zmq.curve_public(keys.master_secret)
    assert keys.worker_public == zmq.curve_public(keys.worker_secret)
    assert (
        len({keys.master_public, keys.worker_public, keys.master_secret, keys.worker_secret}) == 4
    )


def test_same_secret_same_keys_other_secret_other_keys() -> None:
    secret = security.generate_secret()
    assert security.derive_keys(secret) == security.derive_keys(f"  {secret}\n")
    other = security.derive_keys(security.generate_secret())
    assert other.master_public != security.derive_keys(secret).master_public


def test_fresh_keys_are_two_real_curve_pairs() -> None:
    keys = security.fresh_keys()
    assert keys.master_public == zmq.curve_public(keys.master_secret)
    assert keys.worker_public == zmq.curve_public(keys.worker_secret)
    assert len(set(keys)) == 4
    assert security.fresh_keys().master_secret != keys.master_secret


def test_the_cli_and_a_private_run_load_no_openssl() -> None:
    # tm-run's start-up budget: hmac/hashlib load OpenSSL (2-3 ms), which only runs sharing a
    # secret need. A fresh interpreter, so that this test process's imports do not count.
    code = (
        "import sys; import taskmaster.cli, taskmaster.worker, taskmaster.serving; "
        "from taskmaster import security, transport; "
        "keys = security.fresh_keys(); "
        "transport.MasterTransport('tcp://127.0.0.1:*', keys).close(); "
        "print(sorted(m for m in ('hashlib', 'hmac', 'secrets', '_hashlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_cli_imports_without_collecting_and_leaves_their_objects_frozen() -> None:
    # The collector would walk the thousands of objects the imports make a dozen times for
    # nothing; frozen, forked workers never copy their pages to walk them either.
    code = (
        "import gc; count = lambda: sum(s['collections'] for s in gc.get_stats()); "
        "import taskmaster; before = count(); import taskmaster.cli; "
        "print(gc.isenabled(), gc.get_freeze_count() > 1000, count() - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    enabled, frozen, collections = out.stdout.split()
    # At most the one that follows re-enabling, over a young generation left empty (a dozen
    # without the pause).
    assert enabled == frozen == "True" and int(collections) <= 1


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(SecurityError, match="tm secret"):
        security.derive_keys("hunter2")


# -- where the secret comes from ---------------------------------------------------------


def test_secret_file_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tm.secret"
    path.write_text("a" * 64 + "\n")
    path.chmod(0o600)
    monkeypatch.setenv(security.SECRET_ENV, "b" * 64)
    assert security.configured_secret(str(path)) == "a" * 64
    assert security.configured_secret(None) == "b" * 64
    monkeypatch.setenv(security.SECRET_ENV, "  ")
    assert security.configured_secret(None) is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_secret_file_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    path = tmp_path / "tm.secret"
    path.write_text("c" * 64)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="taskmaster.security"):
        assert security.read_secret_file(path) == "c" * 64
    assert f"chmod 600 {path}" in caplog.text


def test_private_secret_file_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tm.secret"
    path.write_text("c" * 64)
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="taskmaster.security"):
        security.read_secret_file(path)
    assert not caplog.records


def test_missing_or_empty_secret_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read secret file"):
        security.configured_secret(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(UsageError, match="tm secret"):
        security.configured_secret(str(empty))


def test_local_secret_is_created_0600_and_reused(tmp_path: Path) -> None:
    first = security.local_secret(tmp_path)
    path = tmp_path / ".taskmaster" / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert security.local_secret(tmp_path) == first
    assert [p.name for p in path.parent.iterdir()] == ["secret"], "no temp file left behind"


RACE = """
import os, sys
from pathlib import Path
from taskmaster import security
directory, gate, me, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(gate / me).touch()
while len(os.listdir(gate)) < n:  # a barrier: nobody goes before everybody is ready
    pass
print(security.local_secret(directory))
"""


def test_processes_starting_together_share_one_local_secret(tmp_path: Path) -> None:
    n = 6
    for round_ in range(5):
        directory, gate = tmp_path / f"run{round_}", tmp_path / f"gate{round_}"
        directory.mkdir()
        gate.mkdir()
        command = [sys.executable, "-c", RACE, str(directory), str(gate)]
        procs = [
            subprocess.Popen([*command, str(i), str(n)], stdout=subprocess.PIPE, text=True)
            for i in range(n)
        ]
        got = [p.communicate(timeout=20)[0].strip() for p in procs]
        assert [p.returncode for p in procs] == [0] * n
        assert len(set(got)) == 1, f"round {round_}: {len(set(got))} different secrets"
        assert (directory / ".taskmaster" / "secret").read_text().strip() == got[0]
        assert sorted(os.listdir(directory / ".taskmaster")) == ["secret"]


# -- addresses and what a bind may be ----------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("tcp://10.0.0.1:3050", "tcp://10.0.0.1:3050"),
        ("127.0.0.1:4000", "tcp://127.0.0.1:4000"),
        (":4000", "tcp://127.0.0.1:4000"),
        ("[::1]:4000", "tcp://[::1]:4000"),
        ("tcp://*:3050", "tcp://*:3050"),
        ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"),
        ("ipc:///tmp/tm.sock", "ipc:///tmp/tm.sock"),
    ],
)
def test_normalize_address(given: str, expected: str) -> None:
    assert security.normalize_address(given) == expected


@pytest.mark.parametrize(
    "bad",
    ["localhost", "host:port", "4000", "tcp://127.0.0.1", "tcp://127.0.0.1:99999", ":0", "x:*"],
)
def test_bad_address_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError):
        security.normalize_address(bad)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("tcp://127.0.0.1:3050", True),
        ("tcp://127.3.2.1:3050", True),
        ("tcp://[::1]:3050", True),
        ("tcp://localhost:3050", True),
        ("tcp://127.0.0.1:*", True),
        ("ipc:///tmp/tm.sock", True),
        ("tcp://0.0.0.0:3050", False),
        ("tcp://*:3050", False),
        ("tcp://[::]:3050", False),
        ("tcp://10.200.0.1:3050", False),
        ("tcp://192.168.1.10:3050", False),
        ("tcp://eth0:3050", False),  # an interface name: not provably loopback
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert security.is_loopback(address) is loopback


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:3050", "tcp://*:3050", "tcp://10.200.0.1:3050"])
def test_non_loopback_master_without_secret_is_refused_with_how_to(address: str) -> None:
    with pytest.raises(SecurityError) as info:
        security.master_secret(address, None)
    message = str(info.value)
    assert "tm secret" in message and "--secret-file" in message and "TM_SECRET" in message
    assert info.value.exit_status == 2
    with pytest.raises(SecurityError, match="--secret-file"):
        security.worker_secret(address, None)


def test_non_loopback_with_a_secret_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(security.SECRET_ENV, "d" * 64)
    assert security.master_secret("tcp://0.0.0.0:3050", None) == "d" * 64
    assert security.worker_secret("tcp://10.200.0.1:3050", None) == "d" * 64


def test_loopback_without_secret_uses_the_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    master = security.master_secret("tcp://127.0.0.1:3050", None)
    assert security.worker_secret("tcp://localhost:3050", None) == master
    assert (tmp_path / ".taskmaster" / "secret").read_text().strip() == master


# -- libzmq ------------------------------------------------------------------------------


def test_this_libzmq_is_accepted() -> None:
    security.check_libzmq()


@pytest.mark.parametrize(
    ("version", "text"), [((4, 3, 1), "4.3.1"), ((4, 2, 5), "4.2.5"), ((3, 2, 6), "3.2.6")]
)
def test_old_libzmq_is_refused(
    monkeypatch: pytest.MonkeyPatch, version: tuple[int, int, int], text: str
) -> None:
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: version)
    monkeypatch.setattr(zmq, "zmq_version", lambda: text)
    with pytest.raises(SecurityError, match=f"libzmq {text} is too old.*4.3.2"):
        security.check_libzmq()


def test_libzmq_4_3_2_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 2))
    monkeypatch.setattr(zmq, "zmq_version", lambda: "4.3.2")
    security.check_libzmq()


def test_libzmq_without_curve_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real_has = zmq.has
    monkeypatch.setattr(
        zmq, "has", lambda capability: False if capability == "curve" else real_has(capability)
    )
    with pytest.raises(SecurityError, match="no CURVE"):
        security.check_libzmq()


# -- the transport's sockets -------------------------------------------------------------


@pytest.fixture(params=["derived", "fresh"])
def keys(request: pytest.FixtureRequest) -> security.Keys:
    # A shared secret's keys (tm-master, tm-worker) and a private run's (tm-run).
    if request.param == "fresh":
        return security.fresh_keys()
    return security.derive_keys(security.generate_secret())


@pytest.fixture
def master(keys: security.Keys):  # type: ignore[no-untyped-def]
    transport = MasterTransport("tcp://127.0.0.1:*", keys)
    yield transport
    transport.close()


def test_master_socket_limits(master: MasterTransport) -> None:
    sock = master.socket
    assert sock.getsockopt(zmq.MAXMSGSIZE) == MASTER_MAX_MSG_BYTES
    assert sock.getsockopt(zmq.HANDSHAKE_IVL) == HANDSHAKE_IVL_MS
    assert sock.getsockopt(zmq.CURVE_SERVER) == 1
    assert sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
    assert sock.getsockopt(zmq.ZAP_ENFORCE_DOMAIN) in (0, 1)  # readable: libzmq >= 4.3
    # ROUTER_MANDATORY is write-only: its effect is that sending to nobody fails, not drops.
    assert master.send(b"no-such-worker", b"x") is False
    assert master.unroutable == 1


def test_zap_accepts_only_the_worker_key(master: MasterTransport, keys: security.Keys) -> None:
    zap = master.zap
    assert zap is not None
    assert zap.allows(b"CURVE", [z85.decode(keys.worker_public)])
    assert not zap.allows(b"CURVE", [z85.decode(keys.master_public)])
    assert not zap.allows(b"CURVE", [os.urandom(32)])
    assert not zap.allows(b"NULL", [])
    assert not zap.allows(b"PLAIN", [b"user", b"password"])
    assert not zap.allows(b"CURVE", [z85.decode(keys.worker_public), b"extra"])


def _until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"


def test_right_secret_talks(master: MasterTransport, keys: security.Keys) -> None:
    worker = WorkerTransport(master.address, keys, b"w1")
    try:
        worker.send(b"hello")
        got: list[tuple[bytes, bytes]] = []

        def master_heard() -> bool:
            master.poll(0.05)
            got.extend(master.receive())
            return bool(got)

        _until(master_heard)
        assert got == [(b"w1", b"hello")]
        assert master.send(b"w1", b"welcome")
        _until(lambda: worker.poll(0.05))
        assert list(worker.receive()) == [b"welcome"]
        assert worker.handshakes == 1 and worker.failed_handshakes == 0
    finally:
        worker.close()


def test_wrong_secret_fails_fast_with_a_clear_message(master: MasterTransport) -> None:
    wrong = security.derive_keys(security.generate_secret())
    worker = WorkerTransport(master.address, wrong, b"w2")
    started = time.monotonic()
    try:
        worker.send(b"let me in")
        with pytest.raises(HandshakeFailed) as info:
            _until(lambda: worker.poll(0.05) and False)
        assert time.monotonic() - started < 5
        assert "secret" in str(info.value) and master.address in str(info.value)
        assert "\n" not in str(info.value)
        master.poll(0)
        assert list(master.receive()) == [], "nothing reached the master"
        _until(lambda: master.poll(0.05) or master.failed_handshakes >= 3)
        assert master.disconnects == 0, "a stranger hanging up is not a worker leaving"
    finally:
        closing = time.monotonic()
        worker.close()
        assert time.monotonic() - closing < 1, "an undeliverable queue must not linger"


def test_wrong_worker_key_is_refused_by_zap_at_once(
    master: MasterTransport, keys: security.Keys
) -> None:
    # Someone who knows the master's public key but not the secret: ZAP says no, and libzmq
    # does not reconnect after that, so the worker must not wait for more failures.
    stranger = security.derive_keys(security.generate_secret())
    mixed = security.Keys(keys.master_public, b"", stranger.worker_public, stranger.worker_secret)
    worker = WorkerTransport(master.address, mixed, b"w3")
    try:
        with pytest.raises(HandshakeFailed, match="secret"):
            _until(lambda: worker.poll(0.05) and False)
        assert worker.refused
        zap = master.zap
        assert zap is not None
        _until(lambda: zap.denied == 1)
    finally:
        worker.close()
