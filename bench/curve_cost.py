"""What CURVE costs: no-op job throughput, encrypted vs plaintext, on loopback.

taskmaster has no way to turn CURVE off (there is no --insecure, and no hidden switch either),
so this script makes the plaintext side itself, in its own processes only. Two figures:

``run`` (the one that matters): ``tm-run NOOP 2 n=N`` end to end, in a fresh process per
measurement. The plaintext runs swap in subclasses of the product's ``MasterTransport`` and
``WorkerTransport`` whose ``_secure`` hook does nothing (no CURVE, no ZAP); everything else,
master loop, feeder, ledger, workers, executor, is the product's own code.

``transport`` (an upper bound on the cost): the transport pair alone. The master process sends
JOBS frames of ``--batch`` pickled ints; each worker process decodes them, unpickles every job
and answers with one ACK, which the master validates. With nothing else to do per job, the
share of time spent in encryption is as large as it can get.

Rounds alternate between the modes; the medians are reported.

    python bench/curve_cost.py                       # both figures
    python bench/curve_cost.py --what run --jobs 1000000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import zmq  # noqa: E402

from taskmaster import protocol, security, transport  # noqa: E402
from taskmaster.transport import MASTER_MAX_MSG_BYTES, MasterTransport, WorkerTransport  # noqa: E402

NOOP_TASKS = Path(__file__).resolve().parent / "tasks" / "noop.py"


# -- end to end: tm-run ------------------------------------------------------------------


class PlaintextMasterTransport(MasterTransport):
    """The product's master transport with its security step left out (benchmark only)."""

    def _secure(self, sock: zmq.Socket[bytes], keys: security.Keys) -> None:
        self.zap = None


class PlaintextWorkerTransport(WorkerTransport):
    """The product's worker transport with its security step left out (benchmark only)."""

    @staticmethod
    def _secure(sock: zmq.Socket[bytes], keys: security.Keys) -> None:
        pass


def one_run(mode: str, jobs: int, workers: int) -> None:
    """In a fresh process: run tm-run over no-op jobs and print the jobs/s."""
    from taskmaster import cli
    from taskmaster import worker as worker_module

    if mode == "plaintext":
        transport.MasterTransport = PlaintextMasterTransport  # type: ignore[misc]
        worker_module.WorkerTransport = PlaintextWorkerTransport  # type: ignore[misc]
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        argv = ["run", str(NOOP_TASKS), str(workers), f"n={jobs}", "--no-progress"]
        argv += ["--state", str(Path(tmp) / "state.db")]
        started = time.perf_counter()
        try:
            cli.main(argv)
        except SystemExit as exc:
            if exc.code != 0:
                raise
        elapsed = time.perf_counter() - started
    print(jobs / elapsed)


def measure_run(encrypted: bool, jobs: int, workers: int) -> float:
    mode = "curve" if encrypted else "plaintext"
    command = [sys.executable, __file__, "--one-run", mode, str(jobs), str(workers)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, start_new_session=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


# -- the transport pair alone ------------------------------------------------------------


class PlainMaster:
    """MasterTransport's socket without CURVE: the baseline."""

    def __init__(self) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, MASTER_MAX_MSG_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.sndhwm = sock.rcvhwm = 0
        sock.bind("tcp://127.0.0.1:*")
        self.socket = sock
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def plain_worker(
    address: str, identity: bytes
) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.routing_id = identity
    sock.sndhwm = sock.rcvhwm = 0
    sock.connect(address)
    return context, sock


def worker_process(address: str, keys: security.Keys | None, index: int) -> None:
    """Decode each batch, 'run' every job (unpickle it), ACK with fresh credit."""
    identity = b"w%d" % index
    if keys is None:
        context, sock = plain_worker(address, identity)
        transport = None
    else:
        transport = WorkerTransport(address, keys, identity)
        sock = transport.socket
    sock.send(protocol.hello("bench", os.getpid(), 1, 0))
    loads = pickle.loads
    while True:
        frame = sock.recv()
        msg = protocol.unpack_from_master(frame)
        if msg[0] == protocol.END:
            break
        seq, first_id, payloads = msg[1], msg[2], msg[3]  # one pickle per job
        for payload in payloads:
            loads(payload)
        sock.send(protocol.ack(len(payloads), [(seq, first_id, len(payloads))], []))
    if transport is not None:
        transport.close(0)
    else:
        sock.close(0)
        context.term()
    os._exit(0)


def measure_transport(
    encrypted: bool, workers: int, batch: int, window: int, seconds: float
) -> float:
    """Jobs per second through one master and ``workers`` worker processes."""
    keys = security.derive_keys(security.generate_secret()) if encrypted else None
    master: MasterTransport | PlainMaster = (
        MasterTransport("tcp://127.0.0.1:*", keys) if keys is not None else PlainMaster()
    )
    sock = master.socket
    sock.rcvtimeo = 30_000  # a worker that died must not hang the benchmark
    pids = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                worker_process(master.address, keys, index)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        pids.append(pid)
    template = [pickle.dumps(i, pickle.HIGHEST_PROTOCOL) for i in range(batch)]
    seq = 0
    next_id = 0
    done = 0
    joined = 0
    started = 0.0
    deadline = float("inf")
    try:
        while True:
            identity, frame = sock.recv_multipart()
            message = protocol.decode_from_worker(frame)
            if isinstance(message, protocol.Hello):
                joined += 1
                sends = window
                if joined == workers:  # the clock starts once every worker is there
                    started = time.perf_counter()
                    deadline = started + seconds
            else:
                assert isinstance(message, protocol.Ack)
                if joined == workers:
                    done += sum(count for _, _, count in message.acks)
                sends = 1
                if time.perf_counter() >= deadline:
                    break
            for _ in range(sends):
                seq += 1
                sock.send_multipart((identity, protocol.jobs(seq, next_id, template)))
                next_id += batch
        elapsed = time.perf_counter() - started
        for index in range(workers):
            sock.send_multipart((b"w%d" % index, protocol.END_FRAME))
        for pid in pids:
            os.waitpid(pid, 0)
        pids.clear()
        return done / elapsed
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except ProcessLookupError:
                pass
        master.close()


def compare(name: str, rounds: int, measure: Callable[[bool], float]) -> tuple[float, float]:
    rates: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):
        # Alternate which goes first so slow drift in machine load hits both alike.
        for encrypted in (False, True) if round_ % 2 == 0 else (True, False):
            rate = measure(encrypted)
            rates[encrypted].append(rate)
            mode = "curve" if encrypted else "plaintext"
            print(f"{name} round {round_ + 1} {mode:9} {rate:12,.0f} jobs/s", file=sys.stderr)
    return statistics.median(rates[False]), statistics.median(rates[True])


def report(title: str, plain: float, curve: float) -> None:
    print(title)
    print(f"  plaintext {plain:12,.0f} jobs/s")
    print(f"  curve     {curve:12,.0f} jobs/s")
    print(f"  cost      {(plain - curve) / plain * 100:11.1f} %")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one-run":
        one_run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=["run", "transport", "both"], default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=500_000, help="no-op jobs per tm-run")
    parser.add_argument("--batch", type=int, default=2000, help="transport: jobs per frame")
    parser.add_argument("--window", type=int, default=2, help="transport: frames in flight")
    parser.add_argument("--seconds", type=float, default=3.0, help="transport: per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    security.check_libzmq()
    print(f"libzmq {zmq.zmq_version()}, {args.workers} workers, median of {args.rounds} rounds")
    if args.what in ("run", "both"):
        plain, curve = compare(
            "run", args.rounds, lambda enc: measure_run(enc, args.jobs, args.workers)
        )
        report(f"tm-run, {args.jobs:,} no-op jobs, wall time incl. start-up:", plain, curve)
    if args.what in ("transport", "both"):
        plain, curve = compare(
            "transport",
            args.rounds,
            lambda enc: measure_transport(enc, args.workers, args.batch, args.window, args.seconds),
        )
        report(f"transport alone, frames of {args.batch:,} jobs (upper bound):", plain, curve)


if __name__ == "__main__":
    main()
