"""The public Python API: what ``import taskmaster`` offers, pinned."""

from __future__ import annotations

import taskmaster
from taskmaster import errors

PUBLIC = [
    "LedgerCorrupt",
    "LedgerError",
    "LedgerLocked",
    "ProtocolError",
    "RunResult",
    "SecurityError",
    "TargetError",
    "TaskmasterError",
    "UsageError",
    "WorkerGaveUp",
    "__version__",
    "run",
]


def test_all_is_pinned() -> None:
    # Adding a name is a decision: update this list and the CHANGELOG together.
    assert sorted(taskmaster.__all__) == PUBLIC


def test_every_public_name_exists() -> None:
    for name in taskmaster.__all__:
        assert hasattr(taskmaster, name), name


def test_version_is_a_string() -> None:
    assert isinstance(taskmaster.__version__, str) and taskmaster.__version__[0].isdigit()


def test_errors_share_one_base() -> None:
    for name in taskmaster.__all__:
        value = getattr(taskmaster, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, errors.TaskmasterError), name


def test_run_result_properties() -> None:
    ok = taskmaster.RunResult(0, 10, 0, 0, 0, 1.0, "s.db")
    failed = taskmaster.RunResult(1, 9, 1, 0, 0, 1.0, "s.db")
    stopped = taskmaster.RunResult(130, 5, 0, 0, 0, 1.0, "s.db")
    assert ok.ok and not ok.interrupted
    assert not failed.ok and not failed.interrupted
    assert stopped.interrupted and not stopped.ok
