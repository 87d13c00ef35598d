"""Two network namespaces joined by a veth pair: a master host and a worker host, made here.

The pair never touches the machine's own namespace: both ends are created inside the test's
namespaces, on a private subnet that exists only there. Names carry a per-run tag so that
concurrent test runs never meet, and everything is deleted by name in :meth:`Hosts.close`.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass

MASTER_IP = "10.200.0.1"
WORKER_IP = "10.200.0.2"
PREFIX = 24


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


@functools.cache
def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    probe = f"tmprobe{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


@dataclass
class Host:
    """One namespace: ``wrap(argv)`` runs a command inside it."""

    netns: str
    ip: str
    device: str

    def wrap(self, *argv: str) -> list[str]:
        # `ip netns exec` execs the command in place (no extra process), so the command is the
        # leader of the session the test starts, and killpg reaches everything it forks.
        return ["ip", "netns", "exec", self.netns, *argv]

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.netns).stdout
        return [int(p) for p in out.split()]


class Hosts:
    """A master host and a worker host joined by one veth link."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.master = Host(f"tm{tag}m", MASTER_IP, f"tm{tag}m0")
        self.worker = Host(f"tm{tag}w", WORKER_IP, f"tm{tag}w0")
        self._made: list[str] = []

    def open(self) -> Hosts:
        try:
            for host in (self.master, self.worker):
                self._run("netns", "add", host.netns)
                self._made.append(host.netns)
                self._run("-n", host.netns, "link", "set", "lo", "up")
            # Both ends are born inside the namespaces: the host's own network never sees them.
            self._run(
                "-n", self.master.netns, "link", "add", self.master.device, "type", "veth",
                "peer", "name", self.worker.device, "netns", self.worker.netns,
            )  # fmt: skip
            for host in (self.master, self.worker):
                address = f"{host.ip}/{PREFIX}"
                self._run("-n", host.netns, "addr", "add", address, "dev", host.device)
                self._run("-n", host.netns, "link", "set", host.device, "up")
        except BaseException:
            self.close()
            raise
        return self

    def _run(self, *args: str) -> None:
        done = _ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def link(self, up: bool) -> None:
        """Bring the master's end of the link down or up: the hosts stop hearing each other."""
        state = "up" if up else "down"
        self._run("-n", self.master.netns, "link", "set", self.master.device, state)

    def close(self) -> None:
        """Kill what still runs inside (our own processes), then delete both namespaces."""
        for name in self._made:
            host = self.master if name == self.master.netns else self.worker
            for pid in host.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in reversed(self._made):
            _ip("netns", "delete", name)
        self._made.clear()
