"""The command line alone: what each command hands to the code that runs it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from taskmaster import cli, security
from taskmaster.options import EXIT_OK, Outcome


@pytest.fixture
def tm_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``tm-run`` with run_all replaced by a recorder of what it was asked to do."""
    (tmp_path / "tasks.py").write_text(
        "def get_jobs():\n    yield 1\n\n\n"
        "def gen():\n    yield 2\n\n\n"
        "def handle_job(j):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    calls: list[dict[str, Any]] = []

    def record(master: Any, worker: Any, n: int, *, private: bool = True) -> Outcome:
        calls.append({"address": master.address, "worker": worker.address, "private": private})
        calls[-1]["label"] = master.label
        return Outcome(EXIT_OK, None)

    monkeypatch.setattr(cli, "run_all", record)
    return calls


def _run(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "tasks.py", "2", *args])
    return int(exit_.value.code or 0)


def test_tm_run_takes_a_free_port_of_its_own_unless_given_an_address(
    tm_run: list[dict[str, Any]],
) -> None:
    assert _run() == EXIT_OK
    assert tm_run[-1]["private"] is True
    # The default port said explicitly is an address like any other: others may join there.
    for given in (security.DEFAULT_ADDRESS, "127.0.0.1:3050", "tcp://127.0.0.1:4000"):
        assert _run("--address", given) == EXIT_OK
        expected = security.normalize_address(given)
        assert tm_run[-1]["address"] == tm_run[-1]["worker"] == expected
        assert tm_run[-1]["private"] is False


def test_another_get_jobs_callback_is_a_run_of_its_own(tm_run: list[dict[str, Any]]) -> None:
    assert _run() == EXIT_OK
    assert _run("--get-jobs-callback", "gen") == EXIT_OK
    assert _run("--get-jobs-callback", "get_jobs") == EXIT_OK
    # The same names as `tasks.py`, `tasks.py:gen`: state files, tm status, tm failures.
    assert [call["label"] for call in tm_run] == ["tasks", "tasks-gen", "tasks"]


def test_every_subcommand_is_a_tm_dash_command_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # SPEC: `tm <sub>` and `tm-<sub>` are the same commands.
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    scripts = dict(re.findall(r'^(tm[-a-z]*) = "taskmaster\.cli:(\w+)"$', pyproject, re.M))
    assert scripts["tm"] == "main" and scripts["tm-slave"] == scripts["tm-worker"]
    for sub in cli.SUBCOMMANDS:
        monkeypatch.setattr("sys.argv", [f"tm-{sub}", "--help"])
        with pytest.raises(SystemExit) as exit_:
            getattr(cli, scripts[f"tm-{sub}"])()
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: tm {sub}"), sub
