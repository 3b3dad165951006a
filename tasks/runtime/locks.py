"""Stage locks that cannot outlive their holder.

Prefect's file lock (SERIALIZABLE isolation) makes a second flow wait while the first computes a stage.
Its lock file records only a random holder id and, by default, no expiry, so a process killed with
SIGKILL left a lock that every later run waited on forever, silently. Here each lock file also records
the holder's host, pid and process start time; a waiter whose lock was left by a process that is gone
takes it over with a log line, and a waiter says what it waits for. Prefect has no hook for this, so
the lock manager is subclassed; everything else (paths, expiry, release) is Prefect's.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psutil
import pydantic_core
from prefect.locking.filesystem import FileSystemLockManager

log = logging.getLogger(__name__)
WAIT_REPORT_SECONDS = 60.0


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """Who holds something: host, pid and the process's start time (a reused pid has another one)."""
    process = psutil.Process(pid)
    return {"host": socket.gethostname(), "pid": process.pid, "started": round(process.create_time(), 2)}


def holder_is_gone(identity: dict[str, Any]) -> bool:
    """True only when we can tell: the holder ran on this host and that process no longer exists.
    A holder on another host (a shared project folder) is never judged from here."""
    if identity.get("host") != socket.gethostname() or not isinstance(identity.get("pid"), int):
        return False
    try:
        process = psutil.Process(identity["pid"])
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent: it holds nothing
            return True
        started = round(process.create_time(), 2)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    return identity.get("started") is not None and abs(started - float(identity["started"])) > 0.05


def describe(identity: dict[str, Any]) -> str:
    if "pid" not in identity:
        return "an unknown process"
    since = time.strftime("%H:%M:%S", time.localtime(identity["started"])) if identity.get("started") else "?"
    return f"pid {identity['pid']} on {identity.get('host', '?')} (started {since})"


class ProjectLockManager(FileSystemLockManager):
    """Prefect's file lock with the holder's identity recorded, written atomically, and taken over when
    its holder is gone."""

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        while True:
            if self.is_locked(key) and not self.is_lock_holder(key, holder):
                if not self.wait_for_lock(key, acquire_timeout):
                    return False
            expiration = None if hold_timeout is None else datetime.now(timezone.utc) + timedelta(seconds=hold_timeout)
            record = {"holder": holder, "expiration": None if expiration is None else str(expiration),
                      **process_identity()}
            if _create_with(path, pydantic_core.to_json(record)):
                self._locks[key] = {**record, "expiration": expiration, "path": path}
                return True
            if self.is_lock_holder(key, holder):
                return True
            # Another process took it between our check and our write: wait for it in the next round.

    def _get_lock_info(self, key: str, use_cache: bool = True):
        # A lock file written by an older version (empty, then filled) may be read half-written: retry.
        for _ in range(100):
            try:
                return super()._get_lock_info(key, use_cache)
            except ValueError:
                time.sleep(0.01)
        return super()._get_lock_info(key, use_cache)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._get_lock_info(key, use_cache=use_cache)
        if info is not None and holder_is_gone(info):
            self._take_over(key, info)
            return False
        return super().is_locked(key, use_cache=use_cache)

    def _take_over(self, key: str, info: dict[str, Any]) -> None:
        """Move the dead holder's file aside (rename is atomic) and check that what moved was that file:
        when two waiters race, the loser may have moved the winner's fresh lock, and puts it back."""
        path = Path(info["path"])
        aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            self._locks.pop(key, None)
            return
        moved = pydantic_core.from_json(aside.read_bytes() or b"{}")
        if moved.get("holder") != info.get("holder"):
            _create_with(path, aside.read_bytes())  # not ours to remove; fails only if a third has it now
        else:
            log.warning("lock %s was held by %s, which is gone (killed?): taking it over", key, describe(info))
        aside.unlink(missing_ok=True)
        self._locks.pop(key, None)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        start = time.monotonic()
        report_at, reported = start + 0.5, False
        while self.is_locked(key, use_cache=False):
            now = time.monotonic()
            if timeout and now - start >= timeout:
                return False
            if now >= report_at:
                if reported:
                    log.warning("still waiting for %s after %.0f s", key, now - start)
                else:
                    holder = describe(self._get_lock_info(key, use_cache=False) or {})
                    log.warning("waiting for %s: another run (%s) is computing it; if that run is stuck, "
                                "stop it or delete %s", key, holder, self._lock_path_for_key(key))
                report_at, reported = now + WAIT_REPORT_SECONDS, True
            time.sleep(0.1)
        return True


def _create_with(path: Path, content: bytes) -> bool:
    """Create `path` holding `content`, atomically and only if it does not exist (a hard link of a
    finished temporary file), so that no reader ever sees a half-written lock."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(content)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
