"""The live display on a terminal (rich); imported only when there is a terminal to draw on."""

from __future__ import annotations

import atexit
import io
import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO, cast

from rich import box
from rich.console import Console, Group, RenderableType
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .progress import (
    MAX_BAR_WIDTH,
    MAX_WORKER_ROWS,
    MIN_BAR_WIDTH,
    REFRESH_PER_SECOND,
    Snapshot,
    Summary,
    WorkerRow,
    _counter_fields,
    _eta_text,
    _Glyphs,
    _glyphs_for,
    _percent,
    _phase_note,
    _progress_fields,
    _replay_text,
    _stall_text,
    _stalled,
    _summary_lines,
    format_duration,
    format_rate,
)

__all__ = ["RichReporter", "wants_live"]


# --- live terminal reporter ----------------------------------------------------------------------


class RichReporter:
    """A live display on a terminal, redrawn by rich's own thread at most a few times a second."""

    def __init__(
        self,
        console: Console | None = None,
        *,
        workers_table: bool = False,
        refresh_per_second: float = REFRESH_PER_SECOND,
    ) -> None:
        self.console = console if console is not None else Console(file=sys.stderr)
        self._workers_table = workers_table
        self._glyphs = _glyphs_for(self.console.encoding)
        # Written by the master's thread, read by the refresh thread: a single attribute
        # assignment of an immutable object, so no lock is needed.
        self._snap: Snapshot | None = None
        self._live = Live(
            get_renderable=self._current,
            console=self.console,
            refresh_per_second=refresh_per_second,
            transient=False,
        )
        self._rerouted: list[tuple[logging.StreamHandler[TextIO], TextIO]] = []

    @staticmethod
    def console_for(stream: TextIO) -> Console:
        return Console(file=stream)

    def start(self) -> None:
        target = cast(TextIO, self.console.file)
        self._live.start(refresh=True)
        # Log records written straight to the terminal would tear the display (a warning per
        # failed job, say): while it is live, handlers writing there go through the console,
        # which prints them above the display.
        proxy = cast(TextIO, FileProxy(self.console, target))
        for handler in _stream_handlers():
            if _same_stream(handler.stream, target):
                old = handler.setStream(proxy)
                self._rerouted.append((handler, old if old is not None else target))
        # Live hides the cursor; if the master dies on an exception before finish(), put the
        # terminal back as it was.
        atexit.register(self._stop)

    def update(self, snap: Snapshot) -> None:
        self._snap = snap

    def finish(self, summary: Summary, last: Snapshot | None) -> None:
        if last is not None:
            self._snap = last
        # Stop first so the last frame is drawn with the final numbers and the summary goes
        # below it rather than being overdrawn.
        self._stop()
        atexit.unregister(self._stop)
        for text, style in _summary_lines(summary, self._glyphs):
            self.console.print(Text(text, style=style))

    def render(self, snap: Snapshot) -> RenderableType:
        """The display for one snapshot (what the refresh thread draws)."""
        g = self._glyphs
        parts: list[RenderableType] = []
        if snap.phase == "replaying":
            parts.append(Text(_replay_text(snap, g), style="cyan"))
        else:
            parts.append(self._headline(snap))
        counters = Text()
        for i, (text, style) in enumerate(_counter_fields(snap)):
            if i:
                counters.append(g.sep, style="dim")
            counters.append(text, style=style)
        parts.append(counters)
        note = _phase_note(snap, g)
        if note is not None:
            parts.append(Text(note[0], style=note[1]))
        stalled = _stalled(snap)
        if stalled is not None:
            parts.append(Text(_stall_text(stalled, g), style="yellow"))
        if self._workers_table and snap.worker_rows:
            parts.append(_worker_table(snap.worker_rows, g))
        return Group(*parts)

    def _current(self) -> RenderableType:
        snap = self._snap
        if snap is None:
            return Text(f"starting{self._glyphs.ellipsis}", style="dim")
        return self.render(snap)

    def _stop(self) -> None:
        self._live.stop()
        while self._rerouted:
            handler, stream = self._rerouted.pop()
            handler.setStream(stream)

    def _headline(self, snap: Snapshot) -> RenderableType:
        g = self._glyphs
        if snap.total is None:
            fields = _progress_fields(snap)
            bar = ProgressBar(total=None, pulse=True)
        else:
            percent = _percent(snap.done, snap.total)
            fields = [
                f"{snap.done:,}/{snap.total:,}",
                f"{percent:.1f}%",
                format_rate(snap.rate),
                _eta_text(snap),
                f"elapsed {format_duration(snap.elapsed_s)}",
            ]
            if snap.total > 0:
                resolved = min(snap.done + snap.failed, snap.total)
                bar = ProgressBar(total=snap.total, completed=resolved)
            else:
                # An empty run is complete; a zero total would divide by zero inside the bar.
                bar = ProgressBar(total=1, completed=1)
        text = Text(g.sep.join(fields), no_wrap=True, overflow="ellipsis")
        # The numbers matter more than the bar: give the bar what the text leaves over.
        room = self.console.width - text.cell_len - 1
        bar.width = max(MIN_BAR_WIDTH, min(MAX_BAR_WIDTH, room))
        grid = Table.grid(padding=(0, 1))
        grid.add_row(bar, text)
        return grid


def _stream_handlers() -> list[logging.StreamHandler[TextIO]]:
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]


def _same_stream(a: object, b: object) -> bool:
    if a is b:
        return True
    # Another handle on the same terminal (stdout beside stderr) tears the display just as well.
    try:
        return os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False


def _worker_table(rows: Sequence[WorkerRow], g: _Glyphs) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("worker")
    table.add_column("host")
    table.add_column("pid", justify="right")
    table.add_column("done", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("last seen", justify="right")
    for row in rows[:MAX_WORKER_ROWS]:
        table.add_row(
            row.name,
            row.host,
            str(row.pid),
            f"{row.done:,}",
            format_rate(row.rate),
            f"{format_duration(row.last_seen_s)} ago",
        )
    if len(rows) > MAX_WORKER_ROWS:
        table.add_row(f"{g.ellipsis} {len(rows) - MAX_WORKER_ROWS:,} more", style="dim")
    return table


def wants_live(console: Console, stream: TextIO) -> bool:
    # TTY_INTERACTIVE is rich's explicit override; honour it either way.
    if "TTY_INTERACTIVE" in os.environ:
        return console.is_interactive
    # FORCE_COLOR makes rich treat any file as a terminal; colour in a CI log is welcome, a live
    # display redrawn four times a second into it is not. So ask the stream itself too.
    try:
        isatty = stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False
    return isatty and console.is_interactive
