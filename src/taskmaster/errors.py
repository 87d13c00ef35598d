"""Every error taskmaster raises on purpose.

::

    TaskmasterError            base class; str(err) is a one-line message for the user
    ├── UsageError             bad command-line usage or configuration (exit 2)
    │   └── TargetError        the tasks file or module cannot be loaded (exit 2)
    ├── SecurityError          no usable secret, libzmq without CURVE, refused bind (exit 2)
    ├── ProtocolError          a message that does not follow the wire format
    ├── LedgerError            the state file cannot be used
    │   ├── LedgerLocked       another master holds it (names the holder)
    │   └── LedgerCorrupt      unreadable, corrupt or written by a newer version
    └── WorkerGaveUp           a worker found no master within --wait, or was refused

The CLI maps each to an exit status and prints ``str(err)`` alone; tracebacks go to the log.
"""

from __future__ import annotations


class TaskmasterError(Exception):
    """Base class of taskmaster's own errors."""

    exit_status = 1


class UsageError(TaskmasterError):
    """Bad usage: the CLI exits 2 with this message."""

    exit_status = 2


class TargetError(UsageError):
    """A tasks file or module that cannot be loaded, or lacks the function asked for."""


class SecurityError(TaskmasterError):
    """Refused for safety: no secret for a non-loopback bind, libzmq without CURVE, …"""

    exit_status = 2


class ProtocolError(TaskmasterError):
    """A frame that does not follow the wire format (dropped by the master, never fatal)."""


class LedgerError(TaskmasterError):
    """The state file cannot be used."""

    exit_status = 2


class LedgerLocked(LedgerError):
    """Another master holds this state file."""


class LedgerCorrupt(LedgerError):
    """The state file is unreadable, corrupt, or from a newer version of taskmaster."""


class WorkerGaveUp(TaskmasterError):
    """A worker found no master within ``--wait`` seconds, or the master refused it."""

    exit_status = 3
