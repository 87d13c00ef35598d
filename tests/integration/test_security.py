"""Safe by default, end to end: secrets, refusals, and a master that survives hostile input.

Real ``tm`` processes on 127.0.0.1. The hostile clients are built here: a DEALER holding the
secret (it derives the worker keys like a worker does) and plain TCP sockets that do not.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import re
import socket
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from taskmaster import protocol, security
from tests.conftest import RECORDING_TASKS, Processes, free_port, read_record, wait_until

pytestmark = pytest.mark.timeout(90)

NOOP_TASKS = """
def get_jobs(n="10", last=None):
    yield from range(last or 0, int(n))

def handle_job(job):
    pass
"""
SEED = int(os.environ.get("TM_FUZZ_SEED", random.randrange(2**32)))


@pytest.fixture(autouse=True)
def _no_secret_in_env(no_secret_in_env: None) -> None:
    """These tests choose their secrets themselves."""


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def status(procs: Processes, *args: str) -> dict[str, Any]:
    result = procs.run("tm", "status", "tasks.py", *args, "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def master_running(procs: Processes, *args: str) -> bool:
    result = procs.run("tm", "status", "tasks.py", *args, "--json", timeout=30)
    return result.returncode == 0 and json.loads(result.stdout)["running"] is True


# -- secrets -----------------------------------------------------------------------------


def test_tm_secret_prints_a_fresh_256_bit_secret(procs: Processes) -> None:
    first, second = procs.run("tm", "secret"), procs.run("tm", "secret")
    assert first.returncode == second.returncode == 0
    assert re.fullmatch(r"[0-9a-f]{64}\n", first.stdout)
    assert first.stdout != second.stdout


def test_no_command_line_option_takes_a_secret(procs: Processes, write_tasks) -> None:
    write_tasks(NOOP_TASKS)
    secret = security.generate_secret()
    for option in ("--secret", f"--secret={secret}", "--key"):
        result = procs.run("tm-master", "tasks.py", option, secret, "--no-progress", timeout=30)
        assert result.returncode == 2, result.stderr
        assert "listening" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("tm-master", "tasks.py", "--address", "tcp://0.0.0.0:{port}"),
        ("tm-master", "tasks.py", "--address", "0.0.0.0:{port}"),
        ("tm-master", "tasks.py", "--address", "tcp://*:{port}"),
        ("tm-worker", "tasks.py", "--address", "tcp://0.0.0.0:{port}"),
        ("tm-spawn", "tasks.py", "2", "--address", "tcp://0.0.0.0:{port}"),
    ],
)
def test_non_loopback_without_secret_exits_2_saying_how(
    procs: Processes, write_tasks, tmp_path: Path, command: tuple[str, ...]
) -> None:
    write_tasks(NOOP_TASKS)
    port = free_port()
    args = [part.format(port=port) for part in command]
    result = procs.run(*args, "--no-progress" if args[0] == "tm-master" else "--wait=5", timeout=30)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "secret" in line and "--secret-file" in line and "TM_SECRET" in line, line
    assert "Traceback" not in result.stderr
    if args[0] == "tm-master":
        assert "tm secret" in line
        assert one_line(result.stderr) == line
        assert not list(tmp_path.glob(".taskmaster/*.db")), "refused before touching the state"
        assert not (tmp_path / ".taskmaster" / "secret").exists()


def test_loopback_needs_no_setup_and_files_are_private(
    procs: Processes, write_tasks, tmp_path: Path
) -> None:
    write_tasks(RECORDING_TASKS)
    record = tmp_path / "record.txt"
    env = {"TM_TEST_RECORD": str(record)}
    address = f"tcp://127.0.0.1:{free_port()}"
    # Started at the same moment: whichever comes first creates .taskmaster/secret.
    spawn = procs.start("tm-spawn", "tasks.py", "2", "--address", address, env=env)
    master = procs.start(
        "tm-master", "tasks.py", "n=200", "--address", address, "--no-progress", env=env
    )
    assert master.wait(timeout=60) == 0, master.communicate()[1].decode()
    assert spawn.wait(timeout=30) == 0, spawn.communicate()[1].decode()
    assert sorted(read_record(record)) == list(range(200))
    secret = tmp_path / ".taskmaster" / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", secret.read_text())
    state_files = [p for p in (tmp_path / ".taskmaster").iterdir() if ".db" in p.name]
    assert state_files
    for path in state_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_tm_run_uses_a_fresh_secret_of_its_own(
    procs: Processes, write_tasks, tmp_path: Path
) -> None:
    write_tasks(RECORDING_TASKS)
    env = {"TM_TEST_RECORD": str(tmp_path / "record.txt")}
    result = procs.run("tm-run", "tasks.py", "2", "n=50", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / ".taskmaster" / "secret").exists()


def test_group_readable_secret_file_is_warned_about(
    procs: Processes, write_tasks, tmp_path: Path
) -> None:
    write_tasks(RECORDING_TASKS)
    secret_file = tmp_path / "tm.secret"
    secret_file.write_text(security.generate_secret() + "\n")
    secret_file.chmod(0o644)
    env = {"TM_TEST_RECORD": str(tmp_path / "record.txt")}
    address = f"tcp://127.0.0.1:{free_port()}"
    common = ("--address", address, "--secret-file", str(secret_file))
    master = procs.start("tm-master", "tasks.py", "n=20", *common, "--no-progress", env=env)
    worker = procs.run("tm-worker", "tasks.py", *common, env=env)
    _, master_err = master.communicate(timeout=30)
    assert master.returncode == 0 and worker.returncode == 0, worker.stderr
    for stderr in (master_err.decode(), worker.stderr):
        assert f"chmod 600 {secret_file}" in stderr


# -- a worker with the wrong secret ------------------------------------------------------


@pytest.mark.parametrize("command", [("tm-worker",), ("tm-spawn", "2")])
def test_wrong_secret_gets_no_job_and_fails_fast(
    procs: Processes, write_tasks, tmp_path: Path, logs, command: tuple[str, ...]
) -> None:
    write_tasks(RECORDING_TASKS)
    record = tmp_path / "record.txt"
    address = f"tcp://127.0.0.1:{free_port()}"
    master_env = {"TM_TEST_RECORD": str(record), security.SECRET_ENV: security.generate_secret()}
    master = procs.start(
        "tm-master", "tasks.py", "n=100", "--address", address, "--no-progress",
        env=master_env, stderr=logs("master.log"),
    )  # fmt: skip
    wait_until(lambda: master_running(procs, "n=100"), timeout=30)
    wrong_env = {**master_env, security.SECRET_ENV: security.generate_secret()}
    started = time.monotonic()
    # --wait is 60s by default: a wrong secret must not be mistaken for an absent master.
    worker = procs.run(
        command[0], "tasks.py", *command[1:], "--address", address, env=wrong_env, timeout=30
    )
    elapsed = time.monotonic() - started
    assert worker.returncode != 0
    assert elapsed < 15, f"took {elapsed:.1f}s: it waited instead of failing fast"
    lines = [line for line in worker.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "secret" in line]
    assert errors, worker.stderr
    assert all("cannot authenticate with the master" in line for line in errors), worker.stderr
    if command[0] == "tm-worker":
        assert len(lines) == 1, worker.stderr
    assert not record.exists(), "no job ran"
    data = status(procs, "n=100")
    assert data["running"] and data["done"] == 0 and data["workers"] == 0
    assert master.poll() is None
    master_log = (tmp_path / "master.log").read_text()
    assert "worker joined" not in master_log
    assert "failed the CURVE handshake: a worker with another secret" in master_log


# -- hostile input -----------------------------------------------------------------------


def worker_socket(
    context: zmq.Context[zmq.Socket[bytes]], keys: security.Keys, address: str
) -> zmq.Socket[bytes]:
    """A DEALER that authenticates like a worker (it holds the secret), and nothing more."""
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = keys.master_public
    sock.curve_publickey = keys.worker_public
    sock.curve_secretkey = keys.worker_secret
    sock.sndtimeo = 20_000
    sock.rcvtimeo = 20_000
    sock.connect(address)
    return sock


INTS = [0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), protocol.MAX_CREDIT + 1]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(10 if depth < 5 else 7)
    if choice == 0:
        return rng.choice(INTS)
    if choice == 1:
        return rng.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, 0.5])
    if choice == 2:
        return rng.choice(["", "x" * rng.randrange(400), "é漢\x00", "ACK"])
    if choice == 3:
        return rng.choice([None, True, False])
    if choice == 4:
        return os.urandom(rng.randrange(40))
    if choice == 5:
        return msgpack.ExtType(rng.randrange(128), os.urandom(rng.randrange(8)))
    if choice == 6:
        return rng.randrange(-5, 20)
    if choice in (7, 8):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    keys = ["host", "pid", "slots", "1", "b'k'", "None"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


TEMPLATES: list[list[Any]] = [
    [protocol.HELLO, protocol.PROTOCOL_VERSION, {"host": "h", "pid": 1, "slots": 1}, 10],
    [protocol.ACK, 5, [[1, 0, 3]], [[1, 3, "E", "m", "tb"]]],
    [protocol.HEARTBEAT, -1, 0.0, 0],
    [protocol.BYE, "bye"],
]


BIG_FRAMES = [
    msgpack.packb([protocol.ACK, 1, [[1, 0, 1]] * 200_000, []]),  # too many entries
    msgpack.packb([protocol.BYE, "x" * 70_000]),  # a string past every limit
]


def lying_header(rng: random.Random) -> bytes:
    """Headers that announce far more than the frame holds, and odd encodings."""
    return rng.choice(
        [
            b"\xdd\xff\xff\xff\xff",  # array32 of 4 billion entries
            b"\xdf\xff\xff\xff\xff",  # map32 of 4 billion pairs
            b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # str32 of 4 GiB
            b"\xc6\x7f\xff\xff\xff",  # bin32 of 2 GiB
            b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB
            b"\x94\xcf" + b"\xff" * 8 + b"\x00\x00\x00",  # [2**64-1, …]
            b"\x94\xd3" + struct.pack(">q", -(2**63)) + b"\xc0\xc0\xc0",
            b"\x91" * rng.randrange(2, 5000) + b"\xc0",  # deep nesting, past repr's limit too
            b"\xc1",  # never used
            b"\x92\x02",  # truncated
        ]
    )


def hostile_frames(rng: random.Random, count: int) -> Iterator[list[bytes]]:
    """``count`` frames (lists of parts) that the master must drop, every one of them."""
    made = 0
    for frame in BIG_FRAMES:
        for _ in range(3):
            made += 1
            yield [frame]
    while made < count:
        kind = rng.randrange(6)
        if kind == 0:
            parts = [os.urandom(rng.randrange(0, 300))]
        elif kind == 1:
            parts = [msgpack.packb(random_value(rng), use_bin_type=rng.random() < 0.5)]
        elif kind == 2:  # a real message with one field wrong, missing or extra
            message = list(rng.choice(TEMPLATES))
            where = rng.randrange(len(message) + 1)
            action = rng.randrange(3)
            if action == 0 and where < len(message):
                message[where] = random_value(rng)
            elif action == 1 and where < len(message):
                del message[where]
            else:
                message.insert(where, random_value(rng))
            parts = [msgpack.packb(message, use_bin_type=True)]
        elif kind == 3:
            parts = [lying_header(rng)]
        elif kind == 4:  # wrong frame count: the master expects exactly one part
            parts = [os.urandom(rng.randrange(0, 50)) for _ in range(rng.randrange(2, 5))]
        else:
            kind_field = rng.choice([0, 5, 10, 12, 99, -1, "1", 1.0, True, None])
            rest = [random_value(rng, 4) for _ in range(rng.randrange(5))]
            parts = [msgpack.packb([kind_field, *rest])]
        if len(parts) == 1:
            try:
                protocol.decode_from_worker(parts[0])
                continue  # a valid message by chance: not hostile, do not send it
            except Exception:  # noqa: BLE001 - any failure to decode: the master must drop it
                pass
        made += 1
        yield parts


def dropped_so_far(log: Path) -> int:
    counts = re.findall(r"dropped frame .*\((\d+) so far\)", log.read_text(errors="replace"))
    return max(map(int, counts), default=0)


def wait_disconnected(monitor: zmq.Socket[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if monitor.poll(100) and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return
    raise AssertionError("the master did not drop the connection")


def raw_garbage(port: int) -> None:
    """Connections without the secret: noise, and ZMTP greetings followed by noise."""
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00"
    payloads = [
        os.urandom(256 * 1024),
        os.urandom(10),
        b"\xff" + os.urandom(64 * 1024),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100,
        greeting + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31 + os.urandom(4096),
        greeting + b"CURVE".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31 + os.urandom(4096),
        greeting + b"PLAIN".ljust(20, b"\x00") + b"\x01" + b"\x00" * 31 + b"\x04\x26\x05HELLO",
        b"",
    ]
    # All at once: those the master cannot reject at once wait out its handshake timeout.
    conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in payloads * 3]
    try:
        for conn, payload in zip(conns, payloads * 3, strict=True):
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                conn.sendall(payload)
        for conn in conns:
            # The master hangs up on each: read until it does.
            with contextlib.suppress(ConnectionResetError):
                while conn.recv(65536):
                    pass
    finally:
        for conn in conns:
            conn.close()


def test_hostile_input_leaves_the_master_running(
    procs: Processes, write_tasks, tmp_path: Path, logs
) -> None:
    rng = random.Random(SEED)
    write_tasks(RECORDING_TASKS)
    record = tmp_path / "record.txt"
    secret = security.generate_secret()
    env = {"TM_TEST_RECORD": str(record), security.SECRET_ENV: secret}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    master = procs.start(
        "tm-master", "tasks.py", "n=500", "--address", address, "--no-progress",
        env=env, stderr=logs("master.log"),
    )  # fmt: skip
    log = tmp_path / "master.log"
    wait_until(lambda: master_running(procs, "n=500"), timeout=30)
    keys = security.derive_keys(secret)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        # 10,000 frames from a client that holds the secret.
        sock = worker_socket(context, keys, address)
        kinds: collections.Counter[int] = collections.Counter()
        for parts in hostile_frames(rng, 10_000):
            kinds[len(parts)] += 1
            sock.send_multipart(parts)
        wait_until(lambda: dropped_so_far(log) >= 10_000, timeout=60)
        assert dropped_so_far(log) == 10_000, f"seed {SEED}"
        assert master.poll() is None, f"seed {SEED}: the master died"
        # One 50 MB frame: over MAXMSGSIZE, so libzmq drops that connection.
        big = worker_socket(context, keys, address)
        monitor = big.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        big.send(os.urandom(50 * 1024 * 1024), copy=False)
        wait_disconnected(monitor)
        big.disable_monitor()
        monitor.close(0)
        big.close(0)
        # And then a valid message on the first connection is still served.
        sock.send(protocol.pack([protocol.HELLO, 999, {"host": "fuzz", "pid": 1, "slots": 1}, 0]))
        assert protocol.unpack_from_master(sock.recv())[0] == protocol.REFUSE
        sock.close(0)
    finally:
        context.destroy(linger=0)
    # Raw garbage from clients that do not hold the secret.
    started = time.monotonic()
    raw_garbage(port)
    print(f"raw garbage: {time.monotonic() - started:.1f}s")
    assert master.poll() is None, f"seed {SEED}: the master died"
    data = status(procs, "n=500")
    assert data["running"] is True and data["done"] == 0
    assert not record.exists()
    # A real worker then completes the run.
    spawn = procs.start("tm-spawn", "tasks.py", "2", "--address", address, env=env)
    assert master.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert spawn.wait(timeout=30) == 0
    ran = collections.Counter(read_record(record))
    assert sorted(ran) == list(range(500)) and set(ran.values()) == {1}
    assert status(procs, "n=500")["done"] == 500


def test_protocol_version_mismatch_is_refused_clearly(
    procs: Processes, write_tasks, tmp_path: Path, logs
) -> None:
    write_tasks(RECORDING_TASKS)
    secret = security.generate_secret()
    env = {"TM_TEST_RECORD": str(tmp_path / "record.txt"), security.SECRET_ENV: secret}
    address = f"tcp://127.0.0.1:{free_port()}"
    master = procs.start(
        "tm-master", "tasks.py", "n=10", "--address", address, "--no-progress",
        env=env, stderr=logs("master.log"),
    )  # fmt: skip
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = worker_socket(context, security.derive_keys(secret), address)
        info = {"host": "old-box", "pid": 7, "slots": 1}
        sock.send(protocol.pack([protocol.HELLO, 999, info, 10]))
        reply = protocol.unpack_from_master(sock.recv())
        sock.close(0)
    finally:
        context.destroy(linger=0)
    assert reply[0] == protocol.REFUSE
    assert "999" in reply[1] and "version" in reply[1]
    assert master.poll() is None
    log = tmp_path / "master.log"
    wait_until(lambda: "protocol 999" in log.read_text(), timeout=10)
    assert "old-box" in log.read_text()


@pytest.mark.parametrize("depth", [1000, 1023])
def test_deeply_nested_frame_is_dropped_not_fatal(
    procs: Processes, write_tasks, tmp_path: Path, logs, depth: int
) -> None:
    # msgpack decodes up to 1024 levels; repr() of such a value exceeds Python's recursion
    # limit, so an error message that shows the bad value must not repr it unbounded.
    write_tasks(NOOP_TASKS)
    secret = security.generate_secret()
    address = f"tcp://127.0.0.1:{free_port()}"
    master = procs.start(
        "tm-master", "tasks.py", "--address", address, "--no-progress",
        env={security.SECRET_ENV: secret}, stderr=logs("master.log"),
    )  # fmt: skip
    nested = b"\x91" * depth + b"\xc0"
    frames = [
        nested,  # the message itself
        b"\x94\x01" + nested + b"\x80\x00",  # HELLO with a nested version
        b"\x94\x02\x00" + nested + b"\x90",  # ACK with nested acks
        b"\x94\x03" + nested + b"\x00\x00",  # HEARTBEAT with a nested job id
    ]
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = worker_socket(context, security.derive_keys(secret), address)
        for frame in frames:
            sock.send(frame)
        info = {"host": "after", "pid": 1, "slots": 1}
        sock.send(protocol.pack([protocol.HELLO, 999, info, 0]))
        # The REFUSE shows the master read everything before it; a dead master sends none.
        wait_until(lambda: sock.poll(50) or master.poll() is not None, timeout=20)
    finally:
        context.destroy(linger=0)
    log = (tmp_path / "master.log").read_text()
    assert master.poll() is None, log[-2000:]
    assert dropped_so_far(tmp_path / "master.log") == len(frames), log[-2000:]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")
def test_ipv6_loopback_needs_no_setup(procs: Processes, write_tasks, tmp_path: Path) -> None:
    write_tasks(RECORDING_TASKS)
    record = tmp_path / "record.txt"
    env = {"TM_TEST_RECORD": str(record)}
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    address = f"tcp://[::1]:{port}"
    master = procs.start(
        "tm-master", "tasks.py", "n=100", "--address", address, "--no-progress", env=env
    )
    spawn = procs.start("tm-spawn", "tasks.py", "2", "--address", address, env=env)
    _, err = master.communicate(timeout=60)
    assert master.returncode == 0, err.decode()
    assert spawn.wait(timeout=30) == 0
    assert sorted(read_record(record)) == list(range(100))


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (protocol.refuse("protocol version 1 is not 2: run the same version"), "refused"),
        (protocol.pack([protocol.WELCOME, 999, 1, {"heartbeat_s": 0.5}]), "protocol 999"),
    ],
)
def test_worker_refused_by_a_master_of_another_version_exits_clearly(
    procs: Processes, write_tasks, answer: bytes, expected: str
) -> None:
    # A master of another version, played here by the real transport answering the HELLO.
    from taskmaster.transport import MasterTransport

    write_tasks(NOOP_TASKS)
    secret = security.generate_secret()
    fake = MasterTransport("tcp://127.0.0.1:*", security.derive_keys(secret))
    try:
        worker = procs.start(
            "tm-worker", "tasks.py", "--address", fake.address, env={security.SECRET_ENV: secret}
        )
        hello: list[tuple[bytes, bytes]] = []

        def got_hello() -> bool:
            fake.poll(0.05)
            hello.extend(fake.receive())
            return bool(hello)

        wait_until(got_hello, timeout=20)
        assert protocol.decode_from_worker(hello[0][1]).version == protocol.PROTOCOL_VERSION  # type: ignore[union-attr]
        assert fake.send(hello[0][0], answer)
        _, err = worker.communicate(timeout=20)
    finally:
        fake.close()
    assert worker.returncode != 0
    line = one_line(err.decode())
    assert expected in line and "version" in line, line
