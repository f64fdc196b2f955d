"""The worker side's reader of a replica's control file (`workers.connector_control`), woken by
the kernel when a line lands, so the engine thread never polls it.

Who calls: `LullConnector` (worker side) makes one at registration; its watcher thread
blocks in the kernel (inotify on the replica's folder) until the node agent appends,
reads the complete new lines, queues them and sets `wake`, the event the engine thread
waits on while it has nothing to do. The engine thread only takes the queued lines
(`take`). Where inotify is missing (not Linux), the thread looks every `fallback_s`:
a poll, but in the watcher thread, never in the engine step.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import select
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, 0o2000000
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100


def _inotify(folder: Path) -> int | None:
    """An inotify descriptor watching `folder` for writes, or None where the kernel offers none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
    if libc.inotify_add_watch(fd, os.fsencode(folder), mask) < 0:
        log.warning("cannot watch %s (%s): the control file is read every poll instead",
                    folder, errno.errorcode.get(ctypes.get_errno(), "?"))
        os.close(fd)
        return None
    return fd


class ControlWatch:
    def __init__(self, path: Path, wake: threading.Event, fallback_s: float = 0.05):
        self.path = Path(path)
        self.wake = wake
        self._offset = 0
        self._lines: collections.deque[tuple[str, str]] = collections.deque()
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._fd = _inotify(self.path.parent)
        self._fallback_s = fallback_s
        self.read_new()  # what was written before the engine started
        self._thread = threading.Thread(target=self._run, name="lull-control-watch", daemon=True)
        self._thread.start()

    @property
    def kernel_wakeups(self) -> bool:
        return self._fd is not None

    def take(self) -> list[tuple[str, str]]:
        """Engine thread: the (verb, session) lines read since the last call; never blocks on I/O."""
        taken = []
        while self._lines:
            taken.append(self._lines.popleft())
        return taken

    def read_new(self) -> int:
        """Read the complete lines appended since the last look; returns how many were new."""
        with self._lock:
            try:
                with self.path.open("rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return 0
            complete = data[: data.rfind(b"\n") + 1]
            self._offset += len(complete)
            lines = [line.partition(" ") for line in complete.decode().splitlines()]
            self._lines.extend((verb, session) for verb, _, session in lines)
            return len(lines)

    def _run(self) -> None:
        watched = [self._stop_r] + ([self._fd] if self._fd is not None else [])
        timeout = None if self._fd is not None else self._fallback_s
        while True:
            ready, _, _ = select.select(watched, [], [], timeout)
            if self._stop_r in ready:
                return
            if self._fd in ready:
                try:
                    os.read(self._fd, 65536)  # drain the events; what changed is read below
                except BlockingIOError:
                    pass
            if self.read_new():
                self.wake.set()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self._stop_r, self._stop_w) + ((self._fd,) if self._fd is not None else ()):
            os.close(fd)
