"""The README's commands run as written, in a fresh copy of the repository's files.

What is executed, exactly:

- every code block fenced as ``sh``, in order, each as one ``bash -e`` script, in a temporary
  directory holding a copy of ``README.md`` and ``examples/`` (so the state files, ``hashes.db``
  and ``users.db`` land there), with this interpreter's ``python`` and ``tm*`` scripts first on
  ``PATH``. Two things are left out, and said so: ``pip install … &&`` prefixes (the package is
  already installed in the environment running the tests), and the block whose command is
  ``python -m pytest`` (it is the command running this test; CI runs it as written);
- every block fenced as ``python``, written to a file and run as a script;
- every ``tm`` command in blocks fenced as ``shell`` (they need more terminals or machines) is
  parsed by the real command-line parser, so a renamed option or a missing example fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from taskmaster import cli

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
PIP_PREFIX = re.compile(r"^pip install [^&]*&&\s*", re.M)
TM_COMMAND = re.compile(r"^(tm(?:-\w+)?)\s+(.*)$")


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def command_lines(block: str) -> list[str]:
    """Each command of a block: comments removed, ``&&`` chains split."""
    lines = []
    for raw in block.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.extend(part.strip() for part in line.split("&&"))
    return lines


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what a fresh clone offers the README's commands."""
    work = tmp_path_factory.mktemp("clone")
    shutil.copy(README, work / "README.md")
    shutil.copytree(ROOT / "examples", work / "examples")
    shutil.copytree(ROOT / "src", work / "src")
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    # `python` is the interpreter running the tests. A script, not a symlink: Python 3.10
    # finds a virtualenv only next to the path it was started by.
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    return work


def environment(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TM_SECRET"}
    first = [str(work / ".bin"), str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join([*first, env["PATH"]])
    return env


def test_readme_has_the_two_command_quick_start() -> None:
    sh = blocks("sh")
    assert sh[0].strip() == "pip install . && tm-run examples/hello.py 4"
    assert sh[1].strip() == "pip install '.[test]' && python -m pytest"


def test_every_sh_block_runs_as_written(workdir: Path) -> None:
    ran = []
    for block in blocks("sh"):
        if command_lines(block)[-1] == "python -m pytest":
            continue  # the command running this very test
        script = PIP_PREFIX.sub("", block)
        result = subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=workdir,
            env=environment(workdir),
            capture_output=True,
            text=True,
            timeout=240,
            start_new_session=True,
        )
        output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert result.returncode == 0, f"{script}\n{output}"
        ran.append((script, result))
    outputs = "\n".join(r.stdout + r.stderr for _, r in ran)
    assert "done: 20,000 jobs" in outputs  # the quick start
    assert "users_v2.db: 1,000,000/1,000,000 rows migrated, 0 wrong: ok" in outputs
    assert re.search(r"primes below 2,000,000", outputs)
    assert len(ran) >= 3


def test_every_python_block_runs(workdir: Path, tmp_path: Path) -> None:
    for i, block in enumerate(blocks("python")):
        script = tmp_path / f"block{i}.py"
        script.write_text(block)
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=workdir,
            env=environment(workdir),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{block}\n{result.stderr}"


def test_every_shell_block_command_parses(workdir: Path) -> None:
    parser = cli._build_parser()
    checked = 0
    for block in blocks("shell"):
        for line in command_lines(block):
            match = TM_COMMAND.match(line)
            if match is None:
                continue
            program, rest = match.groups()
            argv = shlex.split(re.split(r"\s[>|]", rest)[0])  # without redirections
            if program != "tm":
                argv.insert(0, program.removeprefix("tm-"))
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"README command does not parse: {line}")
            tasks = getattr(args, "tasks", None)
            if tasks and tasks.startswith("examples/"):
                assert (workdir / tasks).is_file(), line
            checked += 1
    assert checked >= 6


def test_tm_help_lists_the_readme_commands() -> None:
    table = README.read_text().split("## Commands", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"^\| `tm[ -](\w+)", table, re.M))
    assert documented >= {"run", "master", "spawn", "worker", "status", "failures", "secret"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tm"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^\s{4}(\w+)\s", result.stdout, re.M))
    assert documented <= listed, result.stdout
    # tm-slave is kept for old scripts, not advertised; argparse lists a subcommand whose
    # help is SUPPRESS as "==SUPPRESS==" rather than hiding it.
    assert "SUPPRESS" not in result.stdout, result.stdout
