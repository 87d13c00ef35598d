"""The ``tm`` command and its ``tm-*`` aliases: parse → options → call → exit status.

Only this module reads argv, configures logging and exits. Errors that are the user's to fix
print one line; tracebacks go to the log (``--log-level debug``). Commands import what only
they use, so that ``tm-run`` forks its workers before the master's side (SQLite, the ledger)
has loaded.
"""

from __future__ import annotations

import gc

# Imports (pyzmq above all) make thousands of objects that live as long as the process: the
# collector would walk them a dozen times for nothing, about 1 ms of every start. Frozen
# afterwards, it never walks them (nor copies a forked worker's inherited pages to do so).
_collecting = gc.isenabled()
gc.disable()
try:
    import argparse
    import logging
    import os
    import re
    import sys
    import time
    from collections.abc import Callable, Sequence
    from pathlib import Path
    from typing import TYPE_CHECKING, Any, NoReturn

    from . import __version__, security
    from .errors import TaskmasterError, UsageError
    from .launch import run_all, run_worker, spawn_workers
    from .options import MasterConfig, MasterOptions, WorkerOptions
    from .targets import GET_JOBS, Target, master_callables, parse_target, worker_callables
finally:
    gc.freeze()
    if _collecting:
        gc.enable()

if TYPE_CHECKING:
    from .ledger import LedgerView

_KWARG = re.compile(r"^[A-Za-z_]\w*=")

EXIT_OK = 0
EXIT_INTERRUPTED = 130

logger = logging.getLogger("taskmaster")


def _kwargs(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"expected key=value, got {pair!r}")
        out[key] = value
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


# -- option groups -----------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--secret-file", metavar="PATH", help="file holding the shared secret (or set TM_SECRET)"
    )


def _master_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("master")
    g.add_argument(
        "--size",
        type=_positive_int,
        default=10_000,
        help="jobs buffered ahead of the workers (default 10000)",
    )
    g.add_argument(
        "--state", metavar="PATH", help="state file (default .taskmaster/<target>[-<kwargs>].db)"
    )
    g.add_argument("--reset", action="store_true", help="discard the previous state and start over")
    g.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="re-run a job that raised up to N more times",
    )
    g.add_argument(
        "--retry-failed", action="store_true", help="run only the recorded failures again"
    )
    g.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="fail a job that runs longer, and replace its worker",
    )
    g.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=3,
        metavar="N",
        help="deliveries of a job whose worker dies before it is failed (default 3)",
    )
    g.add_argument(
        "--max-job-bytes",
        type=_positive_int,
        default=64 * 1024 * 1024,
        metavar="N",
        help="fail jobs whose pickle is larger",
    )
    g.add_argument(
        "--total", type=int, metavar="N", help="the number of jobs, for a percentage and an ETA"
    )
    g.add_argument("--checkpoint-interval", type=_seconds, default=0.5, metavar="SECONDS")
    g.add_argument(
        "--liveness",
        type=_seconds,
        default=3.0,
        metavar="SECONDS",
        help="silence after which a worker is lost (default 3)",
    )
    g.add_argument("--get-jobs-callback", metavar="NAME", help="name of the get_jobs function")
    g.add_argument(
        "--no-progress", action="store_true", help="no live progress, only the final summary"
    )
    g.add_argument(
        "--progress",
        choices=["auto", "rich", "log", "none"],
        default="auto",
        help=argparse.SUPPRESS,
    )
    g.add_argument("--workers-table", action="store_true", help="show one row per worker")


def _worker_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("worker")
    g.add_argument(
        "--wait",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long to keep trying to reach a master (default 60)",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run N jobs at once on threads (IO-bound jobs)",
    )
    g.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        metavar="N",
        help="jobs at once for an async def handle_job",
    )
    g.add_argument("--handle-job-callback", metavar="NAME", help="name of the handle_job function")


def _address(p: argparse.ArgumentParser, default: str = security.DEFAULT_ADDRESS) -> None:
    p.add_argument(
        "--address",
        "-a",
        default=default,
        help=f"master endpoint, tcp://host:port or host:port (default {default})",
    )


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", allow_abbrev=False, help="a master and N local workers in one command"
    )
    p.add_argument("tasks", metavar="TASKS")
    p.add_argument("workers", type=_positive_int, metavar="N")
    p.add_argument("kwargs", nargs="*", metavar="key=value")
    _master_options(p)
    _worker_options(p)
    _common(p)
    p.add_argument(
        "--address",
        "-a",
        default=None,
        help="bind here instead of a free loopback port (other workers may then join)",
    )


def _add_master(sub: Any) -> None:
    p = sub.add_parser("master", allow_abbrev=False, help="the controller alone")
    p.add_argument("tasks", metavar="TASKS")
    p.add_argument("kwargs", nargs="*", metavar="key=value")
    _master_options(p)
    _address(p)
    _common(p)


def _add_spawn(sub: Any) -> None:
    p = sub.add_parser(
        "spawn", allow_abbrev=False, help="N worker processes, restarted if one dies"
    )
    p.add_argument("tasks", metavar="TASKS")
    p.add_argument("workers", type=_positive_int, metavar="N")
    _worker_options(p)
    _address(p)
    _common(p)


def _add_worker(sub: Any) -> None:
    # `tm slave` / `tm-slave` (the 2012 name) are rewritten to `worker` in main().
    p = sub.add_parser(
        "worker", allow_abbrev=False, help="one worker process (tm-slave is an alias)"
    )
    p.add_argument("tasks", metavar="TASKS")
    _worker_options(p)
    _address(p)
    _common(p)


def _add_reader(sub: Any, name: str) -> None:
    text = {
        "status": "progress of a run, from its state file",
        "failures": "the failed jobs of a run",
    }[name]
    p = sub.add_parser(name, allow_abbrev=False, help=text)
    p.add_argument("tasks", metavar="TASKS", nargs="?", help="not needed with --state")
    p.add_argument("kwargs", nargs="*", metavar="key=value")
    p.add_argument("--state", metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    if name == "status":
        p.add_argument(
            "--watch",
            nargs="?",
            type=_seconds,
            const=2.0,
            metavar="SECONDS",
            help="refresh every SECONDS (default 2)",
        )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def _add_secret(sub: Any) -> None:
    sub.add_parser("secret", allow_abbrev=False, help="print a fresh random secret")


SUBCOMMANDS: dict[str, Callable[[Any], None]] = {
    "run": _add_run,
    "master": _add_master,
    "spawn": _add_spawn,
    "worker": _add_worker,
    "status": lambda sub: _add_reader(sub, "status"),
    "failures": lambda sub: _add_reader(sub, "failures"),
    "secret": _add_secret,
}


def _build_parser(prog: str = "tm", only: str | None = None) -> argparse.ArgumentParser:
    """The ``tm`` parser; with ``only``, just that subcommand (what ``tm-run`` needs, faster)."""
    # No abbreviations: `--secret HEX` must not be taken for `--secret-file`, which would
    # invite a secret onto the command line, where `ps` shows it.
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog=prog,
        description="Run handle_job on every job get_jobs yields, over processes and machines.",
    )
    parser.add_argument("--version", action="version", version=f"taskmaster {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in SUBCOMMANDS.items():
        if only is None or name == only:
            add(sub)
    return parser


# -- commands ----------------------------------------------------------------------------


def _master_opts(args: argparse.Namespace, target: Target, prog: str) -> MasterOptions:
    kwargs = _kwargs(args.kwargs)
    callables = master_callables(target, args.get_jobs_callback)
    name = args.get_jobs_callback
    if name and name != (target.function or GET_JOBS):
        # TASKS --get-jobs-callback NAME is TASKS:NAME: another generator, a run of its own
        # (state file, resume point), and the name tm status and tm failures know it by.
        target = target._replace(spec=f"{target.module_ref}:{name}", function=name)
    config = MasterConfig(
        size=args.size, timeout_s=args.timeout, retries=max(0, args.retries),
        max_attempts=args.max_attempts, max_job_bytes=args.max_job_bytes, total=args.total,
        checkpoint_interval_s=args.checkpoint_interval, liveness_s=args.liveness,
    )  # fmt: skip
    hint = " ".join(
        ["tm failures", target.spec, *args.kwargs] + (["--state", args.state] if args.state else [])
    )
    return MasterOptions(
        get_jobs=callables.get_jobs, count_jobs=callables.count_jobs, kwargs=kwargs,
        label=target.label, source=target.source,
        state_path=Path(args.state) if args.state else None,
        address=args.address or security.DEFAULT_ADDRESS, secret_file=args.secret_file,
        config=config, reset=args.reset,
        retry_failed=args.retry_failed, progress="none" if args.no_progress else args.progress,
        workers_table=args.workers_table, failures_hint=hint,
    )  # fmt: skip


def _worker_opts(args: argparse.Namespace, target: Target, name: str | None) -> WorkerOptions:
    callables = worker_callables(target, name)
    return WorkerOptions(
        handle_job=callables.handle_job, init_worker=callables.init_worker,
        address=args.address or security.DEFAULT_ADDRESS, secret_file=args.secret_file,
        wait_s=args.wait,
        threads=args.threads, concurrency=args.concurrency,
    )  # fmt: skip


def _cmd_run(args: argparse.Namespace) -> int:
    target = parse_target(args.tasks)
    master = _master_opts(args, target, "tm-run")
    worker = _worker_opts(args, target, args.handle_job_callback)
    if args.address is not None:
        master.address = worker.address = security.normalize_address(args.address)
    return run_all(master, worker, args.workers, private=args.address is None).status


def _cmd_master(args: argparse.Namespace) -> int:
    from .serving import serve_master

    target = parse_target(args.tasks)
    return serve_master(_master_opts(args, target, "tm-master")).status


def _cmd_spawn(args: argparse.Namespace) -> int:
    target = parse_target(args.tasks)
    return spawn_workers(
        _worker_opts(args, target, args.handle_job_callback or target.function), args.workers
    )


def _cmd_worker(args: argparse.Namespace) -> int:
    import signal

    target = parse_target(args.tasks)
    # A lone worker stops on SIGTERM as on Ctrl-C (and as tm-spawn's workers do): it says
    # goodbye, so its master requeues its jobs at once, and exits 130.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run_worker(_worker_opts(args, target, args.handle_job_callback or target.function))


def _state_for(args: argparse.Namespace) -> Path:
    if args.state:
        return Path(args.state)
    if not args.tasks:
        raise UsageError("name the tasks file (as given to tm-run / tm-master) or --state PATH")
    from .serving import default_state_path

    target = parse_target(args.tasks)
    return default_state_path(target.label, _kwargs(args.kwargs))


def status_data(view: LedgerView) -> dict[str, Any]:
    """What ``tm status --json`` prints."""
    cp = view.checkpoint()
    running = view.running()
    resolved = cp.done + cp.failed
    pending = max(cp.total - resolved, 0) if cp.total is not None else (0 if cp.exhausted else None)
    rate = cp.rate if running else 0.0
    eta = pending / rate if (pending is not None and rate > 0) else None
    return {
        "state": str(view.path),
        "done": cp.done,
        "failed": cp.failed,
        "pending": pending,
        "total": cp.total,
        "watermark": cp.watermark,
        "completed_above_watermark": sum(e - s for s, e in cp.ranges or []),
        "in_flight": cp.in_flight if running else 0,
        "workers": cp.workers if running else 0,
        "duplicates": cp.duplicates,
        "retried": cp.retried,
        "running": running,
        "complete": cp.exhausted,
        "rate": rate,
        "eta_s": eta,
        "generator_error": cp.generator_error,
        "started": cp.started,
        "updated": cp.updated,
    }


def _print_status(data: dict[str, Any]) -> None:
    from datetime import datetime

    from .progress import format_duration, format_rate

    total, done = data["total"], f"{data['done']:,}"
    if total is not None:
        done += f"/{total:,} ({data['done'] * 100 / total if total else 100.0:.1f}%)"
    if data["running"]:
        state = "running"
    else:
        state = "complete" if data["complete"] else "stopped (resumable)"
    pending = data["pending"]
    lines = [
        f"{data['state']}: {state}",
        f"  done      {done}",
        f"  failed    {data['failed']:,}",
        f"  pending   {pending:,}" if pending is not None else "  pending   unknown (no total)",
        f"  watermark {data['watermark']:,} (+{data['completed_above_watermark']:,} done above it)",
    ]
    if data["running"]:
        eta = format_duration(data["eta_s"]) if data["eta_s"] is not None else "unknown"
        lines.append(
            f"  rate      {format_rate(data['rate'])} · eta {eta} · "
            f"in flight {data['in_flight']:,} · workers {data['workers']}"
        )
    if data["generator_error"]:
        lines.append(f"  get_jobs failed: {data['generator_error'].splitlines()[0]}")
    try:
        age = time.time() - datetime.fromisoformat(data["updated"]).timestamp()
        ago = f" ({format_duration(age)} ago)"
    except (TypeError, ValueError):  # no checkpoint yet, or a format this Python cannot read
        ago = ""
    lines.append(f"  updated   {data['updated']}{ago}")
    print("\n".join(lines))


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from .ledger import LedgerView

    path = _state_for(args)
    clear = bool(args.watch) and not args.json and sys.stdout.isatty()
    try:
        while True:
            view = LedgerView(path)
            try:
                data = status_data(view)
            finally:
                view.close()
            if clear:
                print("\x1b[H\x1b[2J", end="")  # redraw in place, as watch(1) does
            if args.json:
                print(json.dumps(data))
            else:
                _print_status(data)
            # --watch follows a run to its end, so `tm status --watch` also waits for one.
            if not args.watch or (data["complete"] and not data["running"]):
                return EXIT_OK
            sys.stdout.flush()
            time.sleep(args.watch)
            if not args.json and not clear:
                print()
    except KeyboardInterrupt:
        return EXIT_OK  # the way out of --watch


def _cmd_failures(args: argparse.Namespace) -> int:
    import json

    from .ledger import LedgerView

    view = LedgerView(_state_for(args))
    try:
        failures = view.failures()
    finally:
        view.close()
    if args.json:
        print(json.dumps([f.as_json() for f in failures], indent=2))
        return EXIT_OK
    if not failures:
        print("no failed jobs")
        return EXIT_OK
    for f in failures:
        where = f"attempts {f.attempts}, worker {f.worker}, {f.failed_at}"
        print(f"job {f.job_id} {f.job_repr}: {f.error}: {f.message} ({where})")
        if f.traceback:
            print("    " + f.traceback.rstrip().replace("\n", "\n    "))
    plural = "s" if len(failures) != 1 else ""
    print(f"{len(failures):,} failed job{plural}; re-run them with --retry-failed")
    return EXIT_OK


def _cmd_secret(args: argparse.Namespace) -> int:
    print(security.generate_secret())
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "master": _cmd_master,
    "spawn": _cmd_spawn,
    "worker": _cmd_worker,
    "status": _cmd_status,
    "failures": _cmd_failures,
    "secret": _cmd_secret,
}


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None, prog: str = "tm") -> NoReturn:
    """Entry point of ``tm``; ``tm-<sub>`` calls it with the subcommand filled in."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["slave"]:
        argv[0] = "worker"
    # Building every subcommand's parser costs more than parsing: build the one named.
    parser = _build_parser(prog, only=argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    # `tm-run tasks.py 4 --threads 8 n=100`: key=value after options still counts as kwargs.
    if extra and hasattr(args, "kwargs") and all(_KWARG.match(item) for item in extra):
        args.kwargs = [*args.kwargs, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(getattr(args, "log_level", "warning"))
    name = f"tm {args.command}"
    try:
        status = COMMANDS[args.command](args)
    except TaskmasterError as exc:
        logger.debug("%s failed", name, exc_info=True)
        print(f"{name}: error: {exc}", file=sys.stderr)
        status = exc.exit_status
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    except BrokenPipeError:
        # `tm failures --json | head`: the reader left; that is not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = EXIT_OK
    sys.exit(status)


def _alias(command: str) -> Callable[[], NoReturn]:
    def entry() -> NoReturn:
        main([command, *sys.argv[1:]], prog="tm")

    return entry


run_main = _alias("run")
master_main = _alias("master")
spawn_main = _alias("spawn")
worker_main = _alias("worker")
status_main = _alias("status")
failures_main = _alias("failures")
secret_main = _alias("secret")
