"""taskmaster: run ``handle_job`` on every job ``get_jobs`` yields, over processes and machines.

No broker, bounded memory, resume after any crash. The command line (``tm-run``, ``tm-master``,
``tm-spawn``) is the main interface; :func:`run` does the same from Python.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import RunResult, run
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
