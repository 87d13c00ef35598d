"""Progress reporters: what they write, and when, with no processes and no sleeping."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console

from taskmaster.progress import (
    LogReporter,
    NullReporter,
    Reporter,
    RichReporter,
    Snapshot,
    StalledJob,
    Summary,
    WorkerRow,
    eta_s,
    format_duration,
    format_rate,
    format_summary,
    make_reporter,
)
from tests.conftest import FakeClock

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

SNAP = Snapshot(
    done=12_345,
    done_at_start=0,
    total=100_000,
    failed=3,
    retried=1,
    duplicates=0,
    buffered=812,
    size=10_000,
    in_flight=64,
    workers=4,
    elapsed_s=62.0,
    rate=4_321.0,
    stalled=None,
)
STALLED = SNAP._replace(stalled=StalledJob(job_id=1234, worker="host:4242", running_s=42))
COUNTERS = "buffered 812/10,000 · in flight 64 · workers 4 · failed 3 · retried 1 · duplicates 0"

SUMMARY = Summary(
    done=20_000,
    failed=0,
    duplicates=0,
    retried=0,
    elapsed_s=3.2,
    done_this_run=20_000,
    state_path=".taskmaster/tasks.db",
    failures_hint="tm failures tasks.py",
    interrupted=False,
)


class TtyStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def plain(text: str) -> str:
    return ANSI.sub("", text)


# --- helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0.0s"),
        (3.21, "3.2s"),
        (9.96, "10s"),
        (42.4, "42s"),
        (65, "1m05s"),
        (3_725, "1h02m"),
        (90_000, "1d01h"),
        (-1, "0.0s"),
        (float("inf"), "forever"),
        (float("nan"), "?"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize(
    ("per_s", "expected"),
    [
        (6_250, "6,250/s"),
        (12.5, "12.5/s"),
        (2.4, "2.40/s"),
        (0.05, "3.0/min"),
        (0.0005, "1.8/h"),
        (0, "0/s"),
        (float("nan"), "0/s"),
    ],
)
def test_format_rate(per_s: float, expected: str) -> None:
    assert format_rate(per_s) == expected


def test_eta() -> None:
    assert eta_s(50, 150, 10.0) == 10.0
    assert eta_s(50, None, 10.0) is None
    assert eta_s(50, 150, 0.0) is None
    assert eta_s(150, 150, 0.0) == 0.0
    assert eta_s(200, 150, 5.0) == 0.0


# --- log reporter ----------------------------------------------------------------------------


def test_log_reporter_writes_one_line_per_interval() -> None:
    out, clock = io.StringIO(), FakeClock(100.0)
    reporter = LogReporter(out, interval_s=5.0, clock=clock)
    reporter.start()
    clock.now += 1
    reporter.update(SNAP)
    assert out.getvalue() == ""

    clock.now += 4
    reporter.update(SNAP)
    assert out.getvalue() == (
        f"taskmaster: 12,345/100,000 done (12.3%) · 4,321/s · eta 20s · {COUNTERS}\n"
    )

    clock.now += 1
    reporter.update(SNAP)
    assert out.getvalue().count("\n") == 1
    # After a long stall of the master loop: one line, not a burst of catch-up lines.
    clock.now += 60
    reporter.update(SNAP)
    reporter.update(SNAP)
    assert out.getvalue().count("\n") == 2


def test_log_reporter_without_start_waits_an_interval_from_first_update() -> None:
    out, clock = io.StringIO(), FakeClock(100.0)
    reporter = LogReporter(out, interval_s=5.0, clock=clock)
    reporter.update(SNAP)
    assert out.getvalue() == ""
    clock.now += 5
    reporter.update(SNAP)
    assert "12,345/100,000" in out.getvalue()


def test_log_lines_unknown_total_stall_and_phases() -> None:
    reporter = LogReporter(io.StringIO())
    no_total = STALLED._replace(total=None)
    assert reporter.lines(no_total) == [
        f"taskmaster: 12,345 done · 4,321/s · elapsed 1m02s · {COUNTERS}",
        "taskmaster: ⚠ oldest job 1234 on host:4242 running for 42s",
    ]
    (line,) = reporter.lines(SNAP._replace(phase="stopping"))
    assert line.startswith("taskmaster: stopping · 12,345/100,000 done")
    replay = SNAP._replace(phase="replaying", done_at_start=9_000, replayed=500)
    (line,) = reporter.lines(replay)
    assert line.startswith("taskmaster: replaying 9,000 jobs already done… 500 skipped · ")


def test_log_reporter_falls_back_to_ascii_on_a_narrow_encoding() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    reporter = LogReporter(stream, interval_s=0.0)
    reporter.update(STALLED)
    reporter.update(STALLED)
    reporter.finish(SUMMARY._replace(failed=2), STALLED)
    text = raw.getvalue().decode("ascii")
    assert "12,345/100,000 done (12.3%) | 4,321/s" in text
    assert "taskmaster: ! oldest job 1234" in text
    assert "2 jobs failed" in text


def test_log_reporter_survives_a_closed_stream() -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError

    reporter = LogReporter(Broken(), interval_s=0.0)
    reporter.update(SNAP)
    reporter.update(SNAP)
    reporter.finish(SUMMARY, SNAP)


# --- summary ---------------------------------------------------------------------------------


def test_summary_ok() -> None:
    assert format_summary(SUMMARY) == [
        "done: 20,000 jobs in 3.2s (6,250/s) · failed 0 · duplicates 0 · state .taskmaster/tasks.db"
    ]


def test_summary_resumed_run_rates_only_this_run() -> None:
    (line,) = format_summary(SUMMARY._replace(done_this_run=3_200, retried=2))
    assert line.startswith("done: 20,000 jobs (3,200 this run) in 3.2s (1,000/s) · failed 0")
    assert "retried 2" in line


def test_summary_failed() -> None:
    lines = format_summary(SUMMARY._replace(failed=3))
    assert "failed 3" in lines[0]
    assert lines[1] == "3 jobs failed: list them with `tm failures tasks.py`"
    (_, one) = format_summary(SUMMARY._replace(failed=1))
    assert one.startswith("1 job failed:")


def test_summary_interrupted() -> None:
    lines = format_summary(SUMMARY._replace(interrupted=True, failed=1))
    assert lines[-1] == "interrupted: resumable, run the same command again"
    assert len(lines) == 3


def test_summary_already_complete() -> None:
    summary = SUMMARY._replace(already_complete=True, done_this_run=0, elapsed_s=0.0)
    assert format_summary(summary) == [
        "already complete: 20,000 jobs done, nothing to run (use --reset to start over)"
    ]


def test_null_reporter_prints_only_the_summary() -> None:
    out = io.StringIO()
    reporter = NullReporter(out)
    reporter.start()
    reporter.update(STALLED)
    assert out.getvalue() == ""
    reporter.finish(SUMMARY._replace(interrupted=True), STALLED)
    assert out.getvalue().splitlines() == format_summary(SUMMARY._replace(interrupted=True))


# --- rich reporter ---------------------------------------------------------------------------


def test_rich_render_with_total() -> None:
    console, out = terminal()
    console.print(RichReporter(console).render(SNAP))
    text = plain(out.getvalue())
    assert "━" in text
    assert "12,345/100,000 · 12.3% · 4,321/s · eta 20s · elapsed 1m02s" in text
    assert COUNTERS in text
    assert "oldest job" not in text
    assert "pid" not in text


def test_rich_render_without_total() -> None:
    console, out = terminal()
    console.print(RichReporter(console).render(SNAP._replace(total=None)))
    text = plain(out.getvalue())
    assert "12,345 done · 4,321/s · elapsed 1m02s" in text
    assert "%" not in text


def test_rich_render_stall_line_in_yellow() -> None:
    console, out = terminal()
    console.print(RichReporter(console).render(STALLED))
    assert "\x1b[33m⚠ oldest job 1234 on host:4242 running for 42s" in out.getvalue()


def test_rich_render_workers_table() -> None:
    rows = tuple(WorkerRow(f"w{i}", f"node{i}", 4000 + i, 1_500 * i, 812.0, 0.4) for i in range(3))
    snap = SNAP._replace(worker_rows=rows)
    console, out = terminal()
    console.print(RichReporter(console, workers_table=True).render(snap))
    text = plain(out.getvalue())
    assert re.search(r"host\s+pid\s+done\s+rate\s+last seen", text)
    assert re.search(r"w2\s+node2\s+4002\s+3,000\s+812/s\s+0\.4s ago", text)

    console, out = terminal()
    console.print(RichReporter(console, workers_table=False).render(snap))
    assert "node2" not in out.getvalue()


def test_rich_render_caps_the_workers_table() -> None:
    rows = tuple(WorkerRow(f"w{i}", "node", i, 0, 0.0, 1.0) for i in range(25))
    console, out = terminal()
    snap = SNAP._replace(worker_rows=rows)
    console.print(RichReporter(console, workers_table=True).render(snap))
    text = plain(out.getvalue())
    assert "w19" in text
    assert "w20" not in text
    assert "… 5 more" in text


def test_rich_render_phases() -> None:
    console, out = terminal()
    reporter = RichReporter(console)
    replay = SNAP._replace(phase="replaying", done_at_start=9_000, replayed=500)
    console.print(reporter.render(replay))
    console.print(reporter.render(SNAP._replace(phase="stopping")))
    console.print(reporter.render(SNAP._replace(total=0, done=0, phase="draining")))
    text = plain(out.getvalue())
    assert "replaying 9,000 jobs already done… 500 skipped" in text
    assert "stopping: waiting for 64 jobs in flight…" in text
    assert "draining: every job handed out, waiting for 64 in flight" in text
    assert "0/0 · 100.0%" in text


def test_rich_update_only_stores_the_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    console, _ = terminal()
    reporter = RichReporter(console)

    def no_rendering(snap: Snapshot) -> None:
        raise AssertionError("update() must not render")

    monkeypatch.setattr(reporter, "render", no_rendering)
    for _ in range(1000):
        reporter.update(SNAP)


def test_rich_reporter_lifecycle_draws_last_frame_then_summary() -> None:
    console, out = terminal()
    reporter = RichReporter(console, refresh_per_second=1.0)
    reporter.start()
    reporter.update(SNAP)
    last = SNAP._replace(done=100_000, in_flight=0, buffered=0)
    reporter.finish(SUMMARY._replace(failed=3), last)
    raw = out.getvalue()
    assert "\x1b[?25h" in raw  # cursor shown again
    text = plain(raw)
    frame = text.rindex("100,000/100,000 · 100.0%")
    summary = text.index("done: 20,000 jobs in 3.2s")
    assert frame < summary
    assert "3 jobs failed: list them with `tm failures tasks.py`" in text


def test_rich_finish_without_start_prints_summary() -> None:
    console, out = terminal()
    RichReporter(console).finish(SUMMARY._replace(interrupted=True), None)
    assert "interrupted: resumable, run the same command again" in plain(out.getvalue())


# --- choosing a reporter ---------------------------------------------------------------------


@pytest.fixture
def clean_tty_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("TTY_INTERACTIVE", "TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    return monkeypatch


def test_make_reporter_auto_on_a_file_is_the_log_reporter(
    clean_tty_env: pytest.MonkeyPatch,
) -> None:
    assert isinstance(make_reporter("auto", stream=io.StringIO()), LogReporter)
    # FORCE_COLOR asks for colour, not for a live display redrawn into a log file.
    clean_tty_env.setenv("FORCE_COLOR", "1")
    assert isinstance(make_reporter("auto", stream=io.StringIO()), LogReporter)


def test_make_reporter_auto_on_a_terminal_is_live(clean_tty_env: pytest.MonkeyPatch) -> None:
    assert isinstance(make_reporter("auto", stream=TtyStringIO()), RichReporter)
    clean_tty_env.setenv("TERM", "dumb")
    assert isinstance(make_reporter("auto", stream=TtyStringIO()), LogReporter)
    clean_tty_env.setenv("TERM", "xterm")
    clean_tty_env.setenv("TTY_INTERACTIVE", "0")
    assert isinstance(make_reporter("auto", stream=TtyStringIO()), LogReporter)


def test_make_reporter_explicit_modes() -> None:
    out = io.StringIO()
    assert isinstance(make_reporter("rich", stream=out), RichReporter)
    assert isinstance(make_reporter("log", stream=out), LogReporter)
    assert isinstance(make_reporter("none", stream=out), NullReporter)
    with pytest.raises(ValueError, match="unknown progress mode"):
        make_reporter("fancy", stream=out)


def test_every_reporter_satisfies_the_protocol() -> None:
    out = io.StringIO()
    for reporter in (RichReporter(Console(file=out)), LogReporter(out), NullReporter(out)):
        assert isinstance(reporter, Reporter)


def test_rich_reporter_sends_log_records_through_the_console_while_live() -> None:
    console, out = terminal()
    other = io.StringIO()
    log = logging.getLogger("tests.progress.live")
    same, elsewhere = logging.StreamHandler(out), logging.StreamHandler(other)
    log.addHandler(same)
    log.addHandler(elsewhere)
    try:
        reporter = RichReporter(console, refresh_per_second=1.0)
        reporter.start()
        # A record written straight to the terminal would tear the display: it goes through
        # the console, which prints it above the display.
        assert same.stream is not out
        assert elsewhere.stream is other
        log.warning("failed job=7")
        reporter.finish(SUMMARY, SNAP)
        assert same.stream is out
        text = plain(out.getvalue())
        assert "failed job=7" in text
        assert text.index("failed job=7") < text.index("done: 20,000 jobs")
        assert "failed job=7" in other.getvalue()
    finally:
        log.removeHandler(same)
        log.removeHandler(elsewhere)


def test_no_stall_shown_once_nothing_is_in_flight() -> None:
    # The master hears that the slow job ended (its ack) before it hears the worker is idle.
    over = STALLED._replace(in_flight=0)
    assert len(LogReporter(io.StringIO()).lines(over)) == 1
    console, out = terminal()
    console.print(RichReporter(console).render(over))
    assert "oldest job" not in out.getvalue()


def test_eta_counts_failed_jobs_as_finished() -> None:
    snap = SNAP._replace(done=90_000, failed=5_000, rate=1_000.0)
    (line,) = LogReporter(io.StringIO()).lines(snap)
    assert "90,000/100,000 done (90.0%) · 1,000/s · eta 5.0s" in line
