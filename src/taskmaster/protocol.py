"""The wire format between master and workers: msgpack arrays, no zmq here.

Every control message is one msgpack array whose first element is its type code. Job payloads
are pickled by the master's feeder and travel master → worker only, inside a JOBS message as
opaque bytes: the master never unpickles anything a worker sends, and it validates every worker
message against the small fixed schema below before using it (see :func:`decode_from_worker`).

Worker → master::

    HELLO      [1, version, {"host": str, "pid": int, "slots": int, "died"?: [id, job, seq]},
                credit]                                    died: the predecessor's last job
    ACK        [2, credit, acks, failures, end_window]
                 acks:     [[seq, first_id, count], …]    jobs first_id … first_id+count-1 done
                 failures: [[seq, job_id, error, message, traceback], …]
                 end_window: jobs it needs held to cover a round trip (its slots and a round
                 trip's work), what the master keeps it to at the end of a run; 0: unchanged
    HEARTBEAT  [3, running_job_id or -1, running_s, done_total]
    BYE        [4, reason]                                 leaving; requeue what it holds
    GIVE_BACK  [5, returned, voided]                       jobs it will not start soon
                 returned: [[seq, first_id, count], …]    queued behind jobs that run long:
                                                          the master hands them to others
                 voided:   its credit not used yet (granted minus received; below 0 when
                           jobs sent on it were given back before): void on both sides

Master → worker::

    WELCOME    [10, version, epoch, config]
                 config:   {"heartbeat_s": float, "liveness_s": float, "timeout_s": float|None}
    REFUSE     [11, reason]                                version mismatch or shutting down
    JOBS       [12, seq, ids, payloads, counts]            ids: first id (int) or a list of ids;
                                                           counts an int: one pickle per job;
                                                           a list: payloads[i] is a pickled
                                                           list of counts[i] jobs (packed)
    PING       [13, epoch]                                 master heartbeat
    END        [14]                                        the run is over: exit 0
    PAUSE      [15]                                        master stopping: drop queued jobs, wait
    REHELLO    [16]                                        unknown worker (new master): say HELLO
    PROBE      [17]                                        answer with a HEARTBEAT now
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import msgpack

from .errors import ProtocolError

PROTOCOL_VERSION = 3

HELLO = 1
ACK = 2
HEARTBEAT = 3
BYE = 4
GIVE_BACK = 5

WELCOME = 10
REFUSE = 11
JOBS = 12
PING = 13
END = 14
PAUSE = 15
REHELLO = 16
PROBE = 17

# Bounds on what a worker may send. A frame outside them is dropped by the master.
MAX_WORKER_FRAME_BYTES = 4 * 1024 * 1024
MAX_TEXT = 256
MAX_MESSAGE_TEXT = 4096
MAX_TRACEBACK = 16 * 1024
MAX_ENTRIES = 100_000
MAX_ID = 2**63 - 1
MAX_CREDIT = 1_000_000

_packb = msgpack.Packer(use_bin_type=True).pack


def pack(message: list[Any]) -> bytes:
    """Encode one message."""
    return bytes(_packb(message))


def unpack_from_master(frame: bytes) -> list[Any]:
    """Decode a message sent by the master (trusted once CURVE has authenticated it)."""
    try:
        msg = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}") from None
    if not isinstance(msg, list) or not msg or type(msg[0]) is not int:
        raise ProtocolError("not a taskmaster message")
    return msg


class Hello(NamedTuple):
    version: int
    host: str
    pid: int
    slots: int
    credit: int
    # The worker this one replaces died running a job: (its identity, job id, batch seq).
    died: tuple[bytes, int, int] | None = None


class Ack(NamedTuple):
    credit: int
    acks: list[tuple[int, int, int]]
    failures: list[tuple[int, int, str, str, str]]
    end_window: int = 0  # 0: no news (see the module docstring)


class Heartbeat(NamedTuple):
    running_job: int  # -1 when idle
    running_s: float
    done_total: int


class Bye(NamedTuple):
    reason: str


class GiveBack(NamedTuple):
    returned: list[tuple[int, int, int]]  # (seq, first_id, count), as in an ACK's acks
    voided: int  # credit the worker no longer counts on


WorkerMessage = Hello | Ack | Heartbeat | Bye | GiveBack


def _describe(value: Any) -> str:
    """A short description of a hostile value: never its repr, which can recurse or be huge."""
    if type(value) is int:
        return str(value) if -(10**20) < value < 10**20 else "huge int"
    return type(value).__name__


def _int(value: Any, low: int = 0, high: int = MAX_ID) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"bad integer ({_describe(value)})")
    return value


def _text(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise ProtocolError("expected text")
    return value[:limit]


def _seconds(value: Any) -> float:
    # `not 0 <= x < inf` also rejects NaN, which every comparison would let through later.
    if type(value) not in (int, float) or not 0.0 <= value < math.inf:
        raise ProtocolError("expected a duration in seconds")
    return float(value)


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise ProtocolError("expected a bounded list")
    return value


def decode_from_worker(frame: bytes) -> WorkerMessage:
    """Decode and validate one worker frame; raise ProtocolError for anything off-schema."""
    if len(frame) > MAX_WORKER_FRAME_BYTES:
        raise ProtocolError("frame too large")
    try:
        # Limits stop a hostile frame from allocating far more than it weighs.
        msg = msgpack.unpackb(
            frame,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=0,
            max_ext_len=0,
            # In bytes, while the text limits count characters (up to 4 UTF-8 bytes each).
            max_str_len=4 * MAX_TRACEBACK,
            max_array_len=MAX_ENTRIES,
            max_map_len=16,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}") from None
    if not isinstance(msg, list) or not msg:
        raise ProtocolError("not a message array")
    kind = msg[0]
    if type(kind) is not int:  # True == 1 and 1.0 == 1: neither is HELLO
        raise ProtocolError(f"bad message type ({_describe(kind)})")
    try:
        if kind == ACK and len(msg) == 5:
            return _decode_ack(msg)
        if kind == HEARTBEAT and len(msg) == 4:
            return Heartbeat(_int(msg[1], -1), _seconds(msg[2]), _int(msg[3]))
        if kind == HELLO and len(msg) == 4:
            return _decode_hello(msg)
        if kind == BYE and len(msg) == 2:
            return Bye(_text(msg[1], MAX_TEXT))
        if kind == GIVE_BACK and len(msg) == 3:
            return GiveBack(_job_runs(msg[1]), _int(msg[2], -MAX_CREDIT, MAX_CREDIT))
    except (TypeError, ValueError, IndexError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    raise ProtocolError(f"unknown message type ({_describe(kind)})")


def _decode_hello(msg: list[Any]) -> Hello:
    info = msg[2]
    if not isinstance(info, dict):
        raise ProtocolError("hello without worker info")
    died = info.get("died")
    if died is not None:
        if not isinstance(died, list) or len(died) != 3:
            raise ProtocolError("bad last words in hello")
        identity = _int(died[0], -(2**63), MAX_ID).to_bytes(8, "big", signed=True)
        died = (identity, _int(died[1]), _int(died[2]))
    return Hello(
        version=_int(msg[1]),
        host=_text(info.get("host", "?"), MAX_TEXT),
        pid=_int(info.get("pid", 0)),
        slots=_int(info.get("slots", 1), 1, MAX_CREDIT),
        credit=_int(msg[3], 0, MAX_CREDIT),
        died=died,
    )


def _job_runs(value: Any) -> list[tuple[int, int, int]]:
    """``[[seq, first_id, count], …]``: consecutive jobs of one batch each."""
    runs: list[tuple[int, int, int]] = []
    for entry in _list(value):
        if not isinstance(entry, list) or len(entry) != 3:
            raise ProtocolError("bad job run entry")
        runs.append((_int(entry[0]), _int(entry[1]), _int(entry[2], 1, MAX_CREDIT)))
    return runs


def _decode_ack(msg: list[Any]) -> Ack:
    acks = _job_runs(msg[2])
    failures: list[tuple[int, int, str, str, str]] = []
    for entry in _list(msg[3]):
        if not isinstance(entry, list) or len(entry) != 5:
            raise ProtocolError("bad failure entry")
        failures.append(
            (
                _int(entry[0]),
                _int(entry[1]),
                _text(entry[2], MAX_TEXT),
                _text(entry[3], MAX_MESSAGE_TEXT),
                _text(entry[4], MAX_TRACEBACK),
            )
        )
    return Ack(_int(msg[1], 0, MAX_CREDIT), acks, failures, _int(msg[4], 0, MAX_CREDIT))


# Encoders, one per message, so the field order lives in this module only.


def hello(
    host: str, pid: int, slots: int, credit: int, died: tuple[int, int, int] | None = None
) -> bytes:
    """``died``: (identity as int64, job id, seq) of the worker this one replaces, which
    died running that job."""
    info: dict[str, Any] = {"host": host, "pid": pid, "slots": slots}
    if died is not None:
        info["died"] = list(died)
    return pack([HELLO, PROTOCOL_VERSION, info, credit])


def ack(
    credit: int,
    acks: list[tuple[int, int, int]],
    failures: list[tuple[int, int, str, str, str]],
    end_window: int = 0,
) -> bytes:
    return pack([ACK, credit, acks, failures, end_window])


def heartbeat(running_job: int, running_s: float, done_total: int) -> bytes:
    return pack([HEARTBEAT, running_job, running_s, done_total])


def bye(reason: str) -> bytes:
    return pack([BYE, reason])


def give_back(returned: list[tuple[int, int, int]], voided: int) -> bytes:
    return pack([GIVE_BACK, returned, voided])


def welcome(epoch: int, config: dict[str, Any]) -> bytes:
    return pack([WELCOME, PROTOCOL_VERSION, epoch, config])


def refuse(reason: str) -> bytes:
    return pack([REFUSE, reason])


def jobs(
    seq: int, ids: int | list[int], payloads: list[bytes], counts: int | list[int] | None = None
) -> bytes:
    """JOBS with one pickle per job (``counts`` omitted or an int), or packed: each payload
    a pickled list of jobs and ``counts`` the number of jobs in each."""
    return pack([JOBS, seq, ids, payloads, len(payloads) if counts is None else counts])


def job_count(counts: int | list[int]) -> int:
    return counts if isinstance(counts, int) else sum(counts)


def decode_jobs(message: list[Any]) -> tuple[int, list[int], list[Any]]:
    """A JOBS message as (seq, job ids, jobs), unpickling either form (tests, tools)."""
    import pickle

    _, seq, ids, payloads, counts = message
    n = job_count(counts)
    id_list = list(range(ids, ids + n)) if isinstance(ids, int) else list(ids)
    if isinstance(counts, list):
        return seq, id_list, [job for blob in payloads for job in pickle.loads(blob)]
    return seq, id_list, [pickle.loads(p) for p in payloads]


def ping(epoch: int) -> bytes:
    return pack([PING, epoch])


END_FRAME = pack([END])
PAUSE_FRAME = pack([PAUSE])
REHELLO_FRAME = pack([REHELLO])
PROBE_FRAME = pack([PROBE])
