"""Exclusive locks between processes, on ``fcntl.flock`` (released by the kernel when the holder exits
or is killed, so a crash never leaves a lock held).

- ``RunLock(folder)``: a run folder (training run, evaluation run) belongs to one process for the
  whole run. A second process is refused at once with a ``UserError`` naming the holder (pid, host,
  command, start time), which the holder writes into ``<folder>/.lock``. Holder information left
  there by a process that died is reported as stale and taken over.
- ``claim_folder(folder)``: create a run folder (and its missing parents) and lock it; ``new=True``
  creates it exclusively (two runs never share a name). ``lock.discard()`` removes what the claim
  created, for a run that failed before it produced anything.
- ``build_lock(target)`` / ``build_once(target, is_current, build)``: one process builds a shared
  thing (the synthetic world, a tiny backbone) while the others wait, then find it done.
"""
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from utils.errors import UserError
from utils.io import file_mode

LOCK_FILE = ".lock"


def holder_info() -> dict:
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else "python"
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another process (starting up)"
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')}), running since {info.get('since')}"


def _read_info(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else None
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _open_locked(path: Path, blocking: bool):
    """Open ``path`` (created if missing) and flock it. Returns the fd, or None when busy and not
    ``blocking``. Retries when the file was replaced between open and lock (its folder removed and
    made again by a previous holder), so two processes never hold locks on two different files."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return fd, False
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, True
        os.close(fd)
        path.parent.mkdir(parents=True, exist_ok=True)


class RunLock:
    """``with RunLock(folder, "evaluation run folder"):`` -- the folder must exist."""

    def __init__(self, folder, what: str = "run folder"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_FILE
        self.fd = None
        self.stale = None   # holder information left by a process that died while holding the lock
        self.created: list[Path] = []   # folders claim_folder made (parents first)

    def acquire(self) -> "RunLock":
        fd, locked = _open_locked(self.path, blocking=False)
        if not locked:
            info = _read_info(fd)
            os.close(fd)
            raise UserError(f"{self.what} {self.folder} is in use by {describe_holder(info)}; wait for it to "
                            f"finish or stop it, or choose another folder")
        previous = _read_info(fd)
        if previous is not None:
            self.stale = previous
            print(f"note: {self.folder} was left locked by {describe_holder(previous)}, which "
                  f"{'is no longer running' if not pid_alive(previous.get('pid')) else 'let go of it'}; taking it over",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode("utf-8"), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)   # an empty file: released cleanly (holder info left = a crash)
        except OSError:
            pass
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def clear(self) -> None:
        """Remove everything in the folder but the lock file (``--overwrite``); the lock must be held."""
        assert self.held, "clear() needs the lock"
        for p in self.folder.iterdir():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def discard(self) -> None:
        """A run that failed before producing anything: remove the folder if this claim created it
        (with any parents it created that are empty now), else only its contents; then release."""
        try:
            if self.created and self.created[-1] == self.folder:
                shutil.rmtree(self.folder, ignore_errors=True)
                for d in reversed(self.created[:-1]):
                    try:
                        d.rmdir()
                    except OSError:
                        break
            elif self.held:
                self.clear()
        finally:
            self.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def make_folders(path, exist_ok: bool = True) -> list[Path]:
    """``mkdir -p path``, returning the folders it created (parents first). With ``exist_ok=False``
    the last one must be new: FileExistsError when another process made it first."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o777)   # the umask decides the mode
        except FileExistsError:
            if d == path and not exist_ok:
                raise
            continue
        created.append(d)
    if not exist_ok and path not in created:
        raise FileExistsError(f"{path} exists")
    return created


def claim_folder(folder, what: str = "run folder", new: bool = False) -> RunLock:
    """Create ``folder`` (``new``: it must not exist yet) and lock it; a held lock is a UserError."""
    created = make_folders(folder, exist_ok=not new)
    lock = RunLock(folder, what)
    lock.created = created
    try:
        lock.acquire()
    except BaseException:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return lock


@contextmanager
def build_lock(target, what: str | None = None):
    """Hold ``.<name>.lock`` beside ``target`` while building it; waits (with a note) for another
    process that is building it. The lock file is removed on the way out (a waiting process notices
    the file it locked is gone and locks a new one), so a build leaves nothing beside its target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    fd, locked = _open_locked(path, blocking=False)
    if not locked:
        os.close(fd)
        print(f"note: waiting for another process building {what or target}", file=sys.stderr)
        fd, _ = _open_locked(path, blocking=True)
    try:
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def build_once(target, is_current, build, what: str | None = None) -> bool:
    """Run ``build()`` unless ``is_current()``; returns whether this call built. Concurrent callers
    (the processes of a multi-process launch on a fresh clone) build once: the first holds the lock
    while building, the others wait for it and then find ``target`` current."""
    if is_current():
        return False
    with build_lock(target, what):
        if is_current():
            return False
        build()
        return True
