"""Regenerate docs/screenshot.png: a real ``tm-run`` screen, captured from a real terminal.

    python docs/make_screenshot.py

Needs tmux (the terminal) and rsvg-convert (``apt-get install tmux librsvg2-bin``). The script
runs ``tm-run`` on a demo tasks file (a total from ``count_jobs``, three failing jobs, one job
that hangs until released) inside a detached tmux session, waits for the stall line, captures
the pane with its colours, then has rich draw it as an SVG terminal window and rsvg-convert
turn that into a PNG.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

COLS, ROWS = 118, 15
COMMAND = "tm-run tasks.py 4 --workers-table"
OUT = Path(__file__).resolve().parent / "screenshot.png"

DEMO_TASKS = """
import os, time

def count_jobs(**kwargs):
    return 50_000

def get_jobs(last=None, **kwargs):
    yield from range(last or 0, 50_000)

def handle_job(job):
    if job == 1_234:  # a job that hangs: the screen says which, where, and for how long
        while not os.path.exists("release"):
            time.sleep(0.05)
    elif job in (2_718, 4_669, 8_128):
        raise ValueError(f"no customer {job}")
    time.sleep(0.0012)
"""


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def capture(work: Path, session: str) -> str:
    env = f"cd {work} && PATH={Path(sys.executable).parent}:$PATH TERM=xterm-256color"
    tmux("new-session", "-d", "-s", session, "-x", str(COLS), "-y", str(ROWS))
    try:
        tmux("send-keys", "-t", session, f"{env} {COMMAND}", "Enter")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            screen = tmux("capture-pane", "-p", "-t", session)
            if "oldest job" in screen and "running for 4" in screen:
                return tmux("capture-pane", "-e", "-p", "-t", session)
            time.sleep(0.1)
        raise SystemExit(f"no stall line within 60 s; the screen was:\n{screen}")
    finally:
        (work / "release").touch()
        time.sleep(0.5)
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def render(screen: str) -> str:
    lines = screen.rstrip("\n").split("\n")
    # The shell's own command line (with the PATH set-up) is noise: show the command alone.
    start = next(i for i, line in enumerate(lines) if "WARNING" in line or "━" in line)
    console = Console(record=True, width=COLS, file=io.StringIO(), color_system="truecolor")
    console.print(Text.assemble(("$ ", "bold green"), (COMMAND, "bold")))
    for line in lines[start:]:
        console.print(Text.from_ansi(line), no_wrap=True, overflow="crop")
    svg = console.export_svg(title=COMMAND)
    # rsvg-convert drops a no-break space that starts a span (the dim " · " separators):
    # plain spaces, preserved, draw the same in every renderer.
    return svg.replace("&#160;", " ").replace("<svg ", '<svg xml:space="preserve" ', 1)


def main() -> int:
    for tool in ("tmux", "rsvg-convert"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install tmux librsvg2-bin", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "tasks.py").write_text(DEMO_TASKS)
        svg = work / "screenshot.svg"
        svg.write_text(render(capture(work, f"tm-screenshot-{os.getpid()}")))
        subprocess.run(["rsvg-convert", "--zoom", "1.5", "-o", str(OUT), str(svg)], check=True)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
