"""What the master shows while it runs, and the summary it prints when it stops.

The master builds a :class:`Snapshot` a few times a second and hands it to a :class:`Reporter`:

- :class:`RichReporter` on a terminal: a ``rich`` live display (bar, counters, stall warning,
  optional table of workers). ``update()`` only stores the snapshot; rich's refresh thread does
  the rendering, so the master's loop pays for an attribute assignment and nothing more.
- :class:`LogReporter` anywhere else (CI logs, ``nohup``, a pipe): one plain line every few
  seconds, because a live display off a terminal would show only its last frame.
- :class:`NullReporter` for ``--no-progress``: nothing while running.

All three print the final summary in ``finish()``. :func:`make_reporter` picks one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, TextIO, runtime_checkable

__all__ = [
    "LogReporter",
    "NullReporter",
    "Reporter",
    "RichReporter",  # noqa: F822  (lazy: screen.py, via __getattr__)
    "Snapshot",
    "StalledJob",
    "Summary",
    "WorkerRow",
    "eta_s",
    "format_duration",
    "format_rate",
    "format_summary",
    "make_reporter",
]

REFRESH_PER_SECOND = 4.0
LOG_INTERVAL_S = 5.0
MAX_BAR_WIDTH = 40
MIN_BAR_WIDTH = 10
# Beyond this the table would push the counters off a normal terminal and cost real time to
# render four times a second.
MAX_WORKER_ROWS = 20


class WorkerRow(NamedTuple):
    """One connected worker, for the optional workers table."""

    name: str
    host: str
    pid: int
    done: int
    rate: float
    last_seen_s: float


class StalledJob(NamedTuple):
    """The oldest in-flight job, when it has been running much longer than is typical."""

    job_id: int
    worker: str
    running_s: float


class Snapshot(NamedTuple):
    """The master's numbers at one instant; see the field comments for their meaning."""

    done: int  # finished OK, including those finished before a resume
    done_at_start: int  # of which finished before this master started
    total: int | None  # from count_jobs / --total, else None
    failed: int
    retried: int
    duplicates: int  # completions ignored because the job was already done
    buffered: int  # pulled from get_jobs, waiting to be handed out
    size: int  # capacity of that buffer (--size)
    in_flight: int  # leased to workers, not yet acknowledged
    workers: int
    elapsed_s: float  # since this master started
    rate: float  # jobs/s over the last few seconds
    stalled: StalledJob | None
    worker_rows: tuple[WorkerRow, ...] = ()
    phase: str = "running"  # "running" | "replaying" | "draining" | "stopping"
    replayed: int = 0  # jobs skipped so far during a resume replay


class Summary(NamedTuple):
    """What the master knows when it stops, for the final lines."""

    done: int
    failed: int
    duplicates: int
    retried: int
    elapsed_s: float
    done_this_run: int  # for the mean rate: jobs finished before a resume did not take this time
    state_path: str
    failures_hint: str  # a command listing the failures, e.g. "tm failures tasks.py"
    interrupted: bool  # stopped by a signal: say that running again resumes
    already_complete: bool = False


@runtime_checkable
class Reporter(Protocol):
    """Progress output of one master run."""

    def start(self) -> None:
        """Begin live output, if any."""

    def update(self, snap: Snapshot) -> None:
        """Take the latest numbers; called from the master's loop, so it must be cheap."""

    def finish(self, summary: Summary, last: Snapshot | None) -> None:
        """Stop live output and print the summary (always, whatever the mode)."""


# --- formatting shared by every reporter and by `tm status` ------------------------------------


def format_duration(seconds: float) -> str:
    """A short human duration: ``3.2s``, ``42s``, ``12m05s``, ``3h02m``, ``2d03h``."""
    if math.isnan(seconds):
        return "?"
    if math.isinf(seconds):
        return "forever" if seconds > 0 else "0.0s"
    seconds = max(seconds, 0.0)
    # Compare rounded so 9.96 shows as "10s", not "10.0s".
    if round(seconds, 1) < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_rate(per_s: float) -> str:
    """A job rate with sensible precision: ``6,250/s``, ``12.5/s``, ``2.40/s``, ``3.0/min``."""
    if not math.isfinite(per_s) or per_s <= 0:
        return "0/s"
    if per_s >= 100:
        return f"{per_s:,.0f}/s"
    if per_s >= 10:
        return f"{per_s:.1f}/s"
    if per_s >= 1:
        return f"{per_s:.2f}/s"
    # Slow jobs (minutes each) read better per minute or hour than as 0.00x/s.
    if per_s * 60 >= 1:
        return f"{per_s * 60:.1f}/min"
    return f"{per_s * 3600:.1f}/h"


def eta_s(done: int, total: int | None, rate: float) -> float | None:
    """Seconds left at ``rate``; None when the total or a positive rate is unknown."""
    if total is None:
        return None
    remaining = total - done
    if remaining <= 0:
        return 0.0
    if not math.isfinite(rate) or rate <= 0:
        return None
    return remaining / rate


class _Glyphs(NamedTuple):
    sep: str
    ellipsis: str
    warn: str


_UNICODE = _Glyphs(" · ", "…", "⚠")
_ASCII = _Glyphs(" | ", "...", "!")


def _glyphs_for(encoding: str | None) -> _Glyphs:
    # A progress line must never raise UnicodeEncodeError into the master (LANG=C, odd pipes).
    try:
        "".join(_UNICODE).encode(encoding or "utf-8")
    except (LookupError, UnicodeEncodeError):
        return _ASCII
    return _UNICODE


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _percent(done: int, total: int) -> float:
    return 100.0 if total <= 0 else done * 100.0 / total


def _eta_text(snap: Snapshot) -> str:
    # Failed jobs are finished too: only the unresolved ones are left to wait for.
    left = eta_s(snap.done + snap.failed, snap.total, snap.rate)
    return "eta -" if left is None else f"eta {format_duration(left)}"


def _progress_fields(snap: Snapshot) -> list[str]:
    rate = format_rate(snap.rate)
    if snap.total is None:
        return [f"{snap.done:,} done", rate, f"elapsed {format_duration(snap.elapsed_s)}"]
    share = f"{snap.done:,}/{snap.total:,} done ({_percent(snap.done, snap.total):.1f}%)"
    return [share, rate, _eta_text(snap)]


def _counter_fields(snap: Snapshot) -> list[tuple[str, str]]:
    """``(text, rich style)`` pairs: the log joins the texts, the live display styles them."""
    return [
        (f"buffered {snap.buffered:,}/{snap.size:,}", ""),
        (f"in flight {snap.in_flight:,}", ""),
        (f"workers {snap.workers:,}", "yellow" if snap.workers == 0 else ""),
        (f"failed {snap.failed:,}", "red" if snap.failed else ""),
        (f"retried {snap.retried:,}", ""),
        (f"duplicates {snap.duplicates:,}", ""),
    ]


def _replay_text(snap: Snapshot, g: _Glyphs) -> str:
    return (
        f"replaying {snap.done_at_start:,} jobs already done{g.ellipsis} {snap.replayed:,} skipped"
    )


def _stalled(snap: Snapshot) -> StalledJob | None:
    # The master learns that a job ended from its ack, and what a worker runs from its next
    # heartbeat: with nothing in flight, a stall reported in between is already over.
    return snap.stalled if snap.in_flight else None


def _stall_text(stalled: StalledJob, g: _Glyphs) -> str:
    return (
        f"{g.warn} oldest job {stalled.job_id} on {stalled.worker} "
        f"running for {format_duration(stalled.running_s)}"
    )


def _phase_note(snap: Snapshot, g: _Glyphs) -> tuple[str, str] | None:
    if snap.phase == "draining":
        return (f"draining: every job handed out, waiting for {snap.in_flight:,} in flight", "cyan")
    if snap.phase == "stopping":
        jobs = _plural(snap.in_flight, "job")
        return (f"stopping: waiting for {jobs} in flight{g.ellipsis}", "yellow")
    return None


def _summary_lines(summary: Summary, g: _Glyphs) -> list[tuple[str, str]]:
    """``(text, rich style)`` for each line of the final summary."""
    lines: list[tuple[str, str]] = []
    if summary.already_complete:
        lines.append(
            (
                f"already complete: {_plural(summary.done, 'job')} done, nothing to run "
                "(use --reset to start over)",
                "green",
            )
        )
    else:
        this_run = ""
        if summary.done_this_run != summary.done:
            this_run = f" ({summary.done_this_run:,} this run)"
        mean = ""
        if summary.elapsed_s > 0:
            mean = f" ({format_rate(summary.done_this_run / summary.elapsed_s)})"
        fields = [
            f"done: {_plural(summary.done, 'job')}{this_run} "
            f"in {format_duration(summary.elapsed_s)}{mean}",
            f"failed {summary.failed:,}",
        ]
        if summary.retried:
            fields.append(f"retried {summary.retried:,}")
        fields += [f"duplicates {summary.duplicates:,}", f"state {summary.state_path}"]
        clean = not summary.failed and not summary.interrupted
        lines.append((g.sep.join(fields), "green" if clean else ""))
    if summary.failed:
        failed = _plural(summary.failed, "job")
        lines.append((f"{failed} failed: list them with `{summary.failures_hint}`", "red"))
    if summary.interrupted:
        lines.append(("interrupted: resumable, run the same command again", "yellow"))
    return lines


def format_summary(summary: Summary) -> list[str]:
    """The final summary as plain lines (what the log and null reporters print)."""
    return [text for text, _ in _summary_lines(summary, _UNICODE)]


# --- plain-text reporters ------------------------------------------------------------------------


class _PlainWriter:
    """Writes whole lines to a stream; gives up quietly once the stream is gone."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.glyphs = _glyphs_for(getattr(stream, "encoding", None))
        self._broken = False

    def write(self, lines: Sequence[str]) -> None:
        if self._broken or not lines:
            return
        try:
            self.stream.write("".join(f"{line}\n" for line in lines))
            self.stream.flush()
        except (OSError, ValueError):
            # A closed pipe (`tm-master … | head`) or a closed file must not kill a long run
            # that is otherwise healthy: progress is a convenience, the ledger is the record.
            self._broken = True


class NullReporter:
    """``--no-progress``: nothing while running, the summary at the end."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._out = _PlainWriter(sys.stderr if stream is None else stream)

    def start(self) -> None:
        pass

    def update(self, snap: Snapshot) -> None:
        pass

    def finish(self, summary: Summary, last: Snapshot | None) -> None:
        self._out.write([text for text, _ in _summary_lines(summary, self._out.glyphs)])


class LogReporter:
    """One plain progress line every ``interval_s`` seconds, for logs that are not terminals."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = _PlainWriter(sys.stderr if stream is None else stream)
        self._interval_s = interval_s
        self._clock = clock
        self._next_at: float | None = None

    def start(self) -> None:
        self._next_at = self._clock() + self._interval_s

    def update(self, snap: Snapshot) -> None:
        now = self._clock()
        if self._next_at is None:
            self._next_at = now + self._interval_s
            return
        if now < self._next_at:
            return
        # From now, not from the previous deadline: after a long pause in the master's loop
        # one line is enough, not one per missed interval.
        self._next_at = now + self._interval_s
        self._out.write(self.lines(snap))

    def finish(self, summary: Summary, last: Snapshot | None) -> None:
        self._out.write([text for text, _ in _summary_lines(summary, self._out.glyphs)])

    def lines(self, snap: Snapshot) -> list[str]:
        """The lines one update would write: progress, then a stall notice if any."""
        g = self._out.glyphs
        head = [_replay_text(snap, g)] if snap.phase == "replaying" else _progress_fields(snap)
        if snap.phase not in ("running", "replaying"):
            head.insert(0, snap.phase)
        fields = head + [text for text, _ in _counter_fields(snap)]
        lines = ["taskmaster: " + g.sep.join(fields)]
        stalled = _stalled(snap)
        if stalled is not None:
            lines.append("taskmaster: " + _stall_text(stalled, g))
        return lines


def make_reporter(
    mode: str = "auto",
    *,
    stream: TextIO | None = None,
    workers_table: bool = False,
    log_interval_s: float = LOG_INTERVAL_S,
) -> Reporter:
    """The reporter for ``mode``: ``auto``, ``rich``, ``log`` or ``none`` (``--no-progress``).

    ``auto`` is the live display when ``stream`` (default: stderr) is an interactive terminal,
    else the log reporter.
    """
    out = sys.stderr if stream is None else stream
    if mode == "none":
        return NullReporter(out)
    if mode == "log":
        return LogReporter(out, interval_s=log_interval_s)
    if mode in ("auto", "rich"):
        # rich is imported only for a live display: a run in a pipe or a CI log, and every
        # worker process, start without it.
        if mode == "rich" or "TTY_INTERACTIVE" in os.environ or _isatty(out):
            from .screen import RichReporter, wants_live

            console = RichReporter.console_for(out)
            if mode == "rich" or wants_live(console, out):
                return RichReporter(console, workers_table=workers_table)
        return LogReporter(out, interval_s=log_interval_s)
    raise ValueError(f"unknown progress mode {mode!r}: expected auto, rich, log or none")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def __getattr__(name: str) -> object:
    # RichReporter lives in screen.py so that importing this module does not import rich.
    if name == "RichReporter":
        from .screen import RichReporter

        return RichReporter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
