"""The training log ``<run>/logs/train.jsonl`` and how checkpoints stay consistent with it.

One JSON line per logged step, in step order. A resume continues the log: it keeps the lines of the
steps up to the checkpoint's and appends the rest, so after any sequence of kills and resumes the log
has exactly one line per logged step.

Each checkpoint records ``log_sha256``, the digest of the log lines of its steps (``step <= N``) as
they were when it was saved. A checkpoint *agrees* with the log when the log's lines up to its step
still have that digest. After a resume from an older checkpoint, the later checkpoints of the
abandoned continuation no longer agree (their steps were logged again, differently), so "the latest
checkpoint" of a run is the highest step that agrees with the log, never a stale one.
"""
import hashlib
import json
from pathlib import Path

from utils.errors import UserError
from utils.io import atomic_path

LOG_FILE = Path("logs") / "train.jsonl"


def log_path(run_dir) -> Path:
    return Path(run_dir) / LOG_FILE


def read_lines(path) -> list[tuple[int, str]]:
    """``(step, line)`` of every complete log line. A line cut short by a kill (the last one) or
    otherwise unreadable is left out: it belongs to no checkpoint."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read training log {path}: {e.strerror}") from None
    out = []
    for chunk in raw.split(b"\n"):
        try:
            line = chunk.decode("utf-8")
            step = json.loads(line)["step"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and not isinstance(step, bool):
            out.append((step, line))
    return out


class LogDigest:
    """Running digest of the log lines written so far (what a checkpoint saved now covers)."""

    def __init__(self, lines=()):
        self._h = hashlib.sha256()
        for line in lines:
            self.update(line)

    def update(self, line: str) -> None:
        self._h.update(line.encode("utf-8") + b"\n")

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest_upto(lines: list[tuple[int, str]], step: int) -> str:
    return LogDigest(line for s, line in lines if s <= step).hexdigest()


def truncate(path, step: int) -> list[str]:
    """Keep the lines of steps <= ``step`` (what comes after is logged again); returns them."""
    path = Path(path)
    keep = [line for s, line in read_lines(path) if s <= step]
    if path.exists():
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    return keep


def agrees(log_lines: list[tuple[int, str]] | None, step: int, recorded: str | None) -> bool:
    """Whether a checkpoint of ``step`` that recorded the log digest ``recorded`` agrees with the log.
    Checkpoints written before digests existed (None) and runs without a log agree."""
    if recorded is None or log_lines is None:
        return True
    return digest_upto(log_lines, step) == recorded
