"""Atomic checkpoints with full training state.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over its final name (and the directory fsynced), so a crash at any moment leaves either
the old or the new checkpoint, never a truncated one. Checkpoints hold only tensors, numbers,
strings and containers, and are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

LAST_RE = re.compile(r"^step-(\d+)\.pt$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that exists but cannot be read (truncated, corrupt, not a checkpoint)."""


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    """The state saved at ``path``. A missing file raises ValueError, one that cannot be read
    (truncated by a full disk or a copy cut short) :class:`UnreadableCheckpoint` naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # zip reader, unpickler, short read
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpoint(f"checkpoint {path!r} cannot be read ({reason})") from None
    except Exception as e:  # the restricted unpickler's own errors (weights_only)
        raise UnreadableCheckpoint(
            f"checkpoint {path!r} cannot be read ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise UnreadableCheckpoint(f"checkpoint {path!r} is not a training checkpoint of dcal.train")
    return state


# ----------------------------------------------------------------------------- RNG


def rng_state() -> Dict[str, Any]:
    """Every generator the loop draws from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- directory


class CheckpointDir:
    """``DIR/checkpoints/step-<N>.pt`` (the last ``keep_last`` kept) and ``best.pt``."""

    def __init__(self, out_dir: str, keep_last: int = 2):
        self.dir = os.path.join(out_dir, "checkpoints")
        self.keep_last = keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.dir, f"step-{step:08d}.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.dir, "best.pt")

    def list(self) -> List[str]:
        if not os.path.isdir(self.dir):
            return []
        found = sorted((int(m.group(1)), n) for n in os.listdir(self.dir) if (m := LAST_RE.match(n)))
        return [os.path.join(self.dir, n) for _, n in found]

    def latest(self) -> Optional[str]:
        found = self.list()
        return found[-1] if found else None

    def latest_readable(self, warn: Callable[[str], None] = print) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """(path, state) of the newest checkpoint that loads, newest first; every unreadable one
        on the way is reported through ``warn`` and skipped. (None, None) when none loads."""
        for path in reversed(self.list()):
            try:
                return path, load(path)
            except UnreadableCheckpoint as e:
                warn(f"warning: skipping {e}")
        return None, None

    def save(self, state: Dict[str, Any], step: int, is_best: bool = False) -> str:
        path = self.path(step)
        atomic_save(state, path)
        if is_best:
            tmp = self.best_path + f".tmp-{os.getpid()}"
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.best_path)
        for old in self.list()[: -self.keep_last]:
            os.remove(old)
        return path
