"""The wire format: every encoder round-trips, and the master's decoder rejects anything else.

`decode_from_worker` is the master's only door for worker bytes, so it must turn every bad
frame into a ProtocolError (dropped and counted), never into another exception that would
end the master's loop.
"""

from __future__ import annotations

import math
import random
from typing import Any

import msgpack
import pytest

from taskmaster import protocol
from taskmaster.errors import ProtocolError
from taskmaster.protocol import Ack, Bye, GiveBack, Heartbeat, Hello, decode_from_worker

SEED = 20240611


def packb(message: Any) -> bytes:
    return bytes(msgpack.packb(message, use_bin_type=True))


# -- round trips -------------------------------------------------------------------------


def test_hello_round_trip() -> None:
    frame = protocol.hello("box-1", 4242, 8, 16)
    assert decode_from_worker(frame) == Hello(protocol.PROTOCOL_VERSION, "box-1", 4242, 8, 16)


def test_ack_round_trip() -> None:
    acks = [(7, 0, 100), (8, 100, 1)]
    failures = [(7, 42, "ValueError", "bad value", "Traceback …\nValueError: bad value\n")]
    message = decode_from_worker(protocol.ack(12, acks, failures))
    assert message == Ack(12, acks, failures)
    assert all(type(entry) is tuple for entry in message.acks + message.failures)


def test_empty_ack_round_trip() -> None:
    assert decode_from_worker(protocol.ack(0, [], [])) == Ack(0, [], [])


def test_ack_carries_the_end_window() -> None:
    assert decode_from_worker(protocol.ack(3, [], [], 7)) == Ack(3, [], [], 7)


@pytest.mark.parametrize(("running", "seconds"), [(-1, 0.0), (17, 2.5), (2**63 - 1, 0)])
def test_heartbeat_round_trip(running: int, seconds: float) -> None:
    message = decode_from_worker(protocol.heartbeat(running, seconds, 99))
    assert message == Heartbeat(running, float(seconds), 99)
    assert type(message.running_s) is float


def test_bye_round_trip() -> None:
    assert decode_from_worker(protocol.bye("timeout")) == Bye("timeout")


def test_give_back_round_trip() -> None:
    returned = [(3, 10, 4), (4, 0, 1)]
    assert decode_from_worker(protocol.give_back(returned, 7)) == GiveBack(returned, 7)
    assert decode_from_worker(protocol.give_back(returned, -3)).voided == -3


def test_master_messages_round_trip() -> None:
    unpack = protocol.unpack_from_master
    config = {"heartbeat_s": 0.5, "liveness_s": 3.0, "timeout_s": None}
    assert unpack(protocol.welcome(77, config)) == [
        protocol.WELCOME,
        protocol.PROTOCOL_VERSION,
        77,
        config,
    ]
    assert unpack(protocol.refuse("no")) == [protocol.REFUSE, "no"]
    assert unpack(protocol.jobs(5, 10, [b"a", b"b"])) == [protocol.JOBS, 5, 10, [b"a", b"b"], 2]
    assert unpack(protocol.jobs(7, 10, b"packed", 3)) == [protocol.JOBS, 7, 10, b"packed", 3]
    assert unpack(protocol.jobs(6, [3, 9], [b"x", b"y"])) == [
        protocol.JOBS,
        6,
        [3, 9],
        [b"x", b"y"],
        2,
    ]
    assert unpack(protocol.ping(77)) == [protocol.PING, 77]
    assert unpack(protocol.END_FRAME) == [protocol.END]
    assert unpack(protocol.PAUSE_FRAME) == [protocol.PAUSE]
    assert unpack(protocol.REHELLO_FRAME) == [protocol.REHELLO]
    assert unpack(protocol.PROBE_FRAME) == [protocol.PROBE]


def test_job_payloads_stay_bytes() -> None:
    payload = bytes(range(256))
    assert protocol.unpack_from_master(protocol.jobs(1, 0, [payload]))[3] == [payload]


def test_long_texts_are_truncated_not_rejected() -> None:
    failure = (1, 2, "E" * 1000, "m" * 10_000, "t" * protocol.MAX_TRACEBACK)
    message = decode_from_worker(protocol.ack(0, [], [failure]))
    assert isinstance(message, Ack)
    _, _, error, text, traceback = message.failures[0]
    assert len(error) == protocol.MAX_TEXT
    assert len(text) == protocol.MAX_MESSAGE_TEXT
    assert len(traceback) == protocol.MAX_TRACEBACK


def test_non_ascii_traceback_at_the_character_limit_is_accepted() -> None:
    # Limits count characters; msgpack's limits count bytes. A worker's traceback of
    # MAX_TRACEBACK characters of CJK text is 3 bytes a character and must still get through,
    # or the whole ACK (and every job acknowledged in it) is dropped.
    traceback = "漢" * protocol.MAX_TRACEBACK
    message = decode_from_worker(protocol.ack(1, [(1, 0, 3)], [(1, 3, "E", "漢字", traceback)]))
    assert isinstance(message, Ack)
    assert message.acks == [(1, 0, 3)]
    assert message.failures[0][4] == traceback


def test_hello_defaults_for_missing_info() -> None:
    frame = packb([protocol.HELLO, protocol.PROTOCOL_VERSION, {}, 3])
    assert decode_from_worker(frame) == Hello(protocol.PROTOCOL_VERSION, "?", 0, 1, 3)


def test_other_protocol_version_is_decoded_for_the_master_to_refuse() -> None:
    frame = packb([protocol.HELLO, 99, {"host": "h", "pid": 1, "slots": 1}, 1])
    message = decode_from_worker(frame)
    assert isinstance(message, Hello) and message.version == 99


# -- rejection ---------------------------------------------------------------------------

GOOD_HELLO = [protocol.HELLO, 1, {"host": "h", "pid": 1, "slots": 1}, 1]
BAD_FRAMES: dict[str, bytes] = {
    "empty": b"",
    "garbage": b"\xc1\xff\x00garbage",
    "truncated": protocol.hello("h", 1, 1, 1)[:-3],
    "trailing bytes": protocol.hello("h", 1, 1, 1) + b"\x00",
    "not an array": packb({"type": 1}),
    "int": packb(1),
    "empty array": packb([]),
    "string type": packb(["1", 1, {}, 1]),
    "bool type": packb([True, 1, {"host": "h"}, 1]),
    "float type": packb([1.0, 1, {"host": "h"}, 1]),
    "nil type": packb([None]),
    "unknown type": packb([99, 1, 2, 3]),
    "master type from a worker": packb([protocol.JOBS, 1, 0, []]),
    "hello wrong arity": packb(GOOD_HELLO[:3]),
    "hello info not a map": packb([protocol.HELLO, 1, ["h", 1, 1], 1]),
    "hello host not text": packb([protocol.HELLO, 1, {"host": 5}, 1]),
    "hello negative pid": packb([protocol.HELLO, 1, {"pid": -1}, 1]),
    "hello zero slots": packb([protocol.HELLO, 1, {"slots": 0}, 1]),
    "hello huge credit": packb([protocol.HELLO, 1, {}, protocol.MAX_CREDIT + 1]),
    "hello bool credit": packb([protocol.HELLO, 1, {}, True]),
    "hello float version": packb([protocol.HELLO, 1.0, {}, 1]),
    "hello int map key": packb([protocol.HELLO, 1, {1: "h"}, 1]),
    "hello big map": packb([protocol.HELLO, 1, {f"k{i}": i for i in range(17)}, 1]),
    "ack wrong arity": packb([protocol.ACK, 1, []]),
    "ack of protocol 1 (no end window)": packb([protocol.ACK, 1, [], []]),
    "ack negative end window": packb([protocol.ACK, 1, [], [], -1]),
    "ack huge end window": packb([protocol.ACK, 1, [], [], protocol.MAX_CREDIT + 1]),
    "ack acks not a list": packb([protocol.ACK, 1, {"a": 1}, [], 0]),
    "ack entry short": packb([protocol.ACK, 1, [[1, 2]], [], 0]),
    "ack entry not a list": packb([protocol.ACK, 1, [7], [], 0]),
    "ack zero count": packb([protocol.ACK, 1, [[1, 2, 0]], [], 0]),
    "ack negative id": packb([protocol.ACK, 1, [[1, -2, 1]], [], 0]),
    "ack id above int64": packb([protocol.ACK, 1, [[1, 2**64 - 1, 1]], [], 0]),
    "ack negative credit": packb([protocol.ACK, -1, [], [], 0]),
    "ack huge credit": packb([protocol.ACK, 2**40, [], [], 0]),
    "ack float seq": packb([protocol.ACK, 1, [[1.5, 2, 1]], [], 0]),
    "ack failure short": packb([protocol.ACK, 1, [], [[1, 2, "E", "m"]], 0]),
    "ack failure text not str": packb([protocol.ACK, 1, [], [[1, 2, "E", 5, "tb"]], 0]),
    "ack failure bin traceback": packb([protocol.ACK, 1, [], [[1, 2, "E", "m", b"tb"]], 0]),
    "heartbeat wrong arity": packb([protocol.HEARTBEAT, -1, 0.0]),
    "heartbeat job below -1": packb([protocol.HEARTBEAT, -2, 0.0, 0]),
    "heartbeat seconds text": packb([protocol.HEARTBEAT, 1, "0", 0]),
    "heartbeat negative seconds": packb([protocol.HEARTBEAT, 1, -1.0, 0]),
    "heartbeat nan seconds": packb([protocol.HEARTBEAT, 1, math.nan, 0]),
    "heartbeat infinite seconds": packb([protocol.HEARTBEAT, 1, math.inf, 0]),
    "heartbeat negative done": packb([protocol.HEARTBEAT, 1, 0.0, -5]),
    "give back without voided credit": packb([protocol.GIVE_BACK, []]),
    "give back not a list": packb([protocol.GIVE_BACK, {"a": 1}, 0]),
    "give back entry short": packb([protocol.GIVE_BACK, [[1, 2]], 0]),
    "give back zero count": packb([protocol.GIVE_BACK, [[1, 2, 0]], 0]),
    "give back negative id": packb([protocol.GIVE_BACK, [[1, -2, 1]], 0]),
    "give back huge count": packb([protocol.GIVE_BACK, [[1, 2, protocol.MAX_CREDIT + 1]], 0]),
    "give back huge voided": packb([protocol.GIVE_BACK, [[1, 2, 1]], protocol.MAX_CREDIT + 1]),
    "give back hugely negative voided": packb(
        [protocol.GIVE_BACK, [[1, 2, 1]], -protocol.MAX_CREDIT - 1]
    ),
    "give back float voided": packb([protocol.GIVE_BACK, [[1, 2, 1]], 1.0]),
    "bye wrong arity": packb([protocol.BYE]),
    "bye reason not text": packb([protocol.BYE, 3]),
    "bin anywhere": packb([protocol.BYE, b"bytes"]),
    "ext type": packb([protocol.BYE, msgpack.ExtType(1, b"x")]),
    "too long a list": packb(
        [protocol.ACK, 1, [[1, i, 1] for i in range(protocol.MAX_ENTRIES + 1)], [], 0]
    ),
    "deep nesting": b"\x91" * 100_000 + b"\xc0",
    "claims a huge array": b"\xdd\xff\xff\xff\xff",
    "claims a huge string": b"\xdb\xff\xff\xff\xff",
    "oversize frame": packb([protocol.BYE, "x" * 16]) + b"\x00" * protocol.MAX_WORKER_FRAME_BYTES,
}


@pytest.mark.parametrize("frame", list(BAD_FRAMES.values()), ids=list(BAD_FRAMES))
def test_decode_rejects_with_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_from_worker(frame)


def test_frame_just_under_the_size_limit_is_read() -> None:
    reason = "x" * 100
    frame = packb([protocol.BYE, reason])
    assert len(frame) <= protocol.MAX_WORKER_FRAME_BYTES
    assert decode_from_worker(frame) == Bye(reason)


@pytest.mark.parametrize("frame", [b"", b"\xc1", packb({"a": 1}), packb([]), packb(["x"])])
def test_unpack_from_master_raises_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.unpack_from_master(frame)


# -- fuzz --------------------------------------------------------------------------------

KINDS = [
    protocol.HELLO,
    protocol.ACK,
    protocol.HEARTBEAT,
    protocol.BYE,
    protocol.GIVE_BACK,
    protocol.JOBS,
    0,
    -1,
    True,
    1.0,
    "2",
    None,
]
INTS = [0, 1, -1, 2, 7, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), protocol.MAX_CREDIT]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(13 if depth < 4 else 8)
    if choice == 0:
        return rng.choice(INTS)
    if choice == 1:
        return rng.randrange(-3, 50)
    if choice == 2:
        return rng.choice([0.0, -0.5, 1.5, math.nan, math.inf, -math.inf, 1e308])
    if choice == 3:
        return rng.choice(["", "h", "ValueError", "é漢", "x" * rng.randrange(300)])
    if choice == 4:
        return rng.choice([None, True, False])
    if choice == 5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
    if choice == 6:
        return msgpack.ExtType(rng.randrange(128), b"e")
    if choice == 7:
        return rng.randrange(-1, 5)
    if choice in (8, 9, 10):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    keys = ["host", "pid", "slots", "other"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_message(rng: random.Random) -> list[Any]:
    kind = rng.choice(KINDS)
    if rng.random() < 0.5:
        # Shaped like a real message, so the fuzz reaches the field checks.
        arity = {
            protocol.HELLO: 4,
            protocol.ACK: 5,
            protocol.HEARTBEAT: 4,
            protocol.BYE: 2,
            protocol.GIVE_BACK: 3,
        }
        size = arity.get(kind, 3) if rng.random() < 0.8 else rng.randrange(6)
        return [kind, *(random_value(rng) for _ in range(size - 1))]
    return [kind, *(random_value(rng) for _ in range(rng.randrange(5)))]


def assert_valid(message: protocol.WorkerMessage) -> None:
    """What the master relies on once a frame decoded."""

    def is_int(x: object, low: int = 0) -> bool:
        return type(x) is int and low <= x <= protocol.MAX_ID

    if isinstance(message, Hello):
        assert is_int(message.version) and is_int(message.pid)
        assert isinstance(message.host, str) and len(message.host) <= protocol.MAX_TEXT
        assert 1 <= message.slots <= protocol.MAX_CREDIT
        assert 0 <= message.credit <= protocol.MAX_CREDIT
    elif isinstance(message, Ack):
        assert 0 <= message.credit <= protocol.MAX_CREDIT
        for seq, first, count in message.acks:
            assert is_int(seq) and is_int(first) and 1 <= count <= protocol.MAX_CREDIT
        for seq, job, error, text, traceback in message.failures:
            assert is_int(seq) and is_int(job)
            assert all(isinstance(t, str) for t in (error, text, traceback))
    elif isinstance(message, Heartbeat):
        assert is_int(message.running_job, -1) and is_int(message.done_total)
        assert type(message.running_s) is float and 0 <= message.running_s < math.inf
    elif isinstance(message, GiveBack):
        for seq, first, count in message.returned:
            assert is_int(seq) and is_int(first) and 1 <= count <= protocol.MAX_CREDIT
        assert type(message.voided) is int and abs(message.voided) <= protocol.MAX_CREDIT
    else:
        assert isinstance(message, Bye) and isinstance(message.reason, str)


def test_fuzz_random_msgpack_structures() -> None:
    rng = random.Random(SEED)
    decoded = 0
    for i in range(20_000):
        message = random_message(rng)
        decoded += _decodes_or_refuses(packb(message), i, message)
    assert decoded > 0, "the fuzz never produced a valid message: it tests nothing"


def _decodes_or_refuses(frame: bytes, case: int, shown: object) -> bool:
    """Decode a hostile frame: a valid message, or a ProtocolError, never anything else."""
    try:
        result = decode_from_worker(frame)
    except ProtocolError:
        return False
    except Exception as exc:  # pragma: no cover - the failure report
        raise AssertionError(f"seed {SEED} case {case}: {shown!r:.300} raised {exc!r}") from exc
    assert_valid(result)
    return True


def test_fuzz_random_bytes() -> None:
    rng = random.Random(SEED)
    valid_prefix = [
        protocol.hello("h", 1, 1, 1),
        protocol.ack(1, [(1, 2, 3)], []),
        protocol.bye("x"),
        protocol.give_back([(1, 2, 3)], 4),
    ]
    for i in range(20_000):
        if i % 2:
            frame = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            # Mutate a valid frame: flip, cut or extend a few bytes.
            frame = bytearray(rng.choice(valid_prefix))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(3)
                if op == 0 and frame:
                    frame[rng.randrange(len(frame))] = rng.randrange(256)
                elif op == 1 and frame:
                    del frame[rng.randrange(len(frame)) :]
                else:
                    frame.insert(rng.randrange(len(frame) + 1), rng.randrange(256))
            frame = bytes(frame)
        _decodes_or_refuses(frame, i, frame)
