"""A cgroup v1 memory limit for one benchmark child: RSS and page cache together, the same for every engine.

One fresh group per child, so its peak and its page cache are that run's alone. Pages another group read
stay charged to that group, free to later readers: drop the page cache before a limited run.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


class CgroupError(RuntimeError):
    pass


class MemoryLimit:
    """`with MemoryLimit(bytes) as group:` start the child with `preexec_fn=group.join`; read `group.peak()`."""

    def __init__(self, limit: int, name: str | None = None):
        self.limit = int(limit)
        self.path = ROOT / (name or f"flashmoe-bench-{os.getpid()}")

    def __enter__(self):
        if not (ROOT / "memory.limit_in_bytes").is_file():
            raise CgroupError(f"{ROOT}: no cgroup v1 memory controller here; --memory-limit needs one")
        if os.geteuid() != 0:
            raise CgroupError("--memory-limit needs root (it creates a cgroup under /sys/fs/cgroup/memory)")
        self.path.mkdir(exist_ok=True)
        self._write("memory.limit_in_bytes", self.limit)
        if (self.path / "memory.memsw.limit_in_bytes").exists():
            self._write("memory.memsw.limit_in_bytes", self.limit)  # no escape into swap
        return self

    def _write(self, name: str, value):
        (self.path / name).write_text(f"{value}\n")

    def join(self):
        """Move the calling process into the group (run in the child, before it execs)."""
        self._write("cgroup.procs", os.getpid())

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        lines = (self.path / "memory.oom_control").read_text().splitlines()
        return next((int(l.split()[1]) for l in lines if l.startswith("oom_kill ")), 0)

    def __exit__(self, *exc):
        try:
            self.path.rmdir()
        except OSError:
            pass  # a straggler still inside: the group goes when it does
