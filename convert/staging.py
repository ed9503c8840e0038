"""Crash-safe output for a conversion: a staging directory, atomic files, per-unit completion records.

Owns `DST.partial/`: every file lands under a temporary name and is renamed when complete; each finished
unit (a decoder layer, or the non-layer tensors) leaves a record of its files' checksums so `--resume`
can check it instead of redoing it; `commit` renames the directory to DST only when everything is there.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from pathlib import Path

STATE_DIR = ".flashmoe-convert"
JOB_FILE = "job.json"
CHUNK = 16 << 20


class OutputError(RuntimeError):
    pass


def file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc & 0xFFFFFFFF


def disk_error(e: BaseException, path: Path) -> OutputError:
    """A failed write as one line; the half-written temporary is removed, finished units are kept."""
    path.unlink(missing_ok=True)
    full = getattr(e, "errno", None) == errno.ENOSPC or "space" in str(e).lower()
    what = "disk full" if full else (getattr(e, "strerror", None) or str(e))
    return OutputError(f"{path}: {what}; finished layers are kept, free space and rerun with --resume")


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staging:
    def __init__(self, out: Path, job: dict, *, resume: bool, overwrite: bool):
        self.out = out
        self.dir = out.with_name(out.name + ".partial")
        self.state = self.dir / STATE_DIR
        if out.exists() and not overwrite:
            raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
        if self.dir.exists():
            if resume:
                self._check_job(job)
                return
            if not overwrite:
                raise OutputError(
                    f"{self.dir}: an interrupted conversion is there; pass --resume to continue it "
                    "or --overwrite to start again"
                )
            shutil.rmtree(self.dir)
        try:
            self.state.mkdir(parents=True)
            self.write_json(self.state / JOB_FILE, job)
        except OSError as e:
            raise disk_error(e, self.state / JOB_FILE) from None

    def _check_job(self, job: dict):
        try:
            before = json.loads((self.state / JOB_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            raise OutputError(f"{self.dir}: not a conversion this version can resume; use --overwrite") from None
        job = json.loads(json.dumps(job))  # compare as stored: tuples read back as lists
        if before != job:
            changed = sorted(k for k in set(before) | set(job) if before.get(k) != job.get(k))
            raise OutputError(
                f"{self.dir}: the interrupted conversion used different options ({', '.join(changed)}); "
                "repeat them, or pass --overwrite to start again"
            )

    # ---------------------------------------------------------------- atomic files

    def path(self, name: str) -> Path:
        return self.dir / name

    def temp(self, name: str) -> Path:
        """A name that no loader globs (hidden), renamed into place by `publish`."""
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p.with_name(f".tmp-{p.name}")

    def publish(self, name: str):
        tmp = self.temp(name)
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
        except OSError as e:
            raise disk_error(e, tmp) from None

    def copy_in(self, src: Path):
        tmp = self.temp(src.name)
        try:
            shutil.copyfile(src, tmp)
        except OSError as e:
            raise disk_error(e, tmp) from None
        self.publish(src.name)

    @staticmethod
    def write_text(path: Path, text: str) -> None:
        tmp = path.with_name(f".tmp-{path.name}")
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise disk_error(e, tmp) from None

    def write_json(self, path: Path, doc) -> None:
        self.write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")

    # ---------------------------------------------------------------- unit records

    def _unit_file(self, unit: int) -> Path:
        return self.state / f"unit-{unit:05d}.json"

    def finish_unit(self, unit: int, record: dict):
        record = dict(record, files={n: file_crc(self.dir / n) for n in record["files"]})
        self.write_json(self._unit_file(unit), record)

    def finished_unit(self, unit: int, check) -> dict | None:
        """The unit's record if it completed and its files still match; None means redo it."""
        try:
            record = json.loads(self._unit_file(unit).read_text())
            for name, crc in record["files"].items():
                if file_crc(self.dir / name) != crc:
                    return None
            check(record)
            return record
        except (OSError, ValueError, KeyError):
            return None

    def commit(self):
        """Drop the resume state and move the finished directory into place, replacing any old one."""
        shutil.rmtree(self.state)
        for leftover in self.dir.rglob(".tmp-*"):
            leftover.unlink()
        for folder in {self.dir, *(p.parent for p in self.dir.rglob("*"))}:
            _fsync_dir(folder)  # the renames inside are durable before the directory gets its final name
        old = self.out.with_name(self.out.name + ".old")
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        _fsync_dir(self.out.parent)
        if old.exists():
            shutil.rmtree(old)
