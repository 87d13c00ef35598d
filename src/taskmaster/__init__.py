"""taskmaster: run ``handle_job`` on every job ``get_jobs`` yields, over processes and machines.

No broker, bounded memory, resume after any crash. The command line (``tm-run``, ``tm-master``,
``tm-spawn``) is the main interface; :func:`run` does the same from Python.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from .errors import (
    LedgerCorrupt,
    LedgerError,
    LedgerLocked,
    ProtocolError,
    SecurityError,
    TargetError,
    TaskmasterError,
    UsageError,
    WorkerGaveUp,
)

if TYPE_CHECKING:
    from .api import RunResult, run


def __getattr__(name: str) -> Any:
    # The Python API loads on first use: the tm commands start faster without it.
    if name in ("run", "RunResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
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
