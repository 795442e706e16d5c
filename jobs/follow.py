"""Follow a running job's log in the terminal (``--cluster local``, so ``make demo``): its
progress lines as rank 0 writes them, without the libraries' noise.

A progress line is one that starts with a bracketed job tag: ``[pretrain] epoch 0 step 50/234
loss 0.91 ... eta 1.2 min``, ``[linear_probe] start: ...``, ``[eval] knn: top1=...``. Lines with
an ``eta`` (the periodic ones) are shown at most once per ``every_s`` per tag, and a tag's last
one is always shown when the job ends; checkpoint lines are skipped; everything else of the
kind is shown as it comes. The whole log stays where it is (its path is printed first).
"""
from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

PROGRESS = re.compile(r"^\[([A-Za-z_][\w.\[\]-]*)\] ")    # "[2026-12-06 ...]" (a library's) is not
SKIP = re.compile(r"^\[[^\]]+\] checkpoint ")


class LogFollower:
    """Prints the progress lines appended to ``path`` since the last ``poll``."""

    def __init__(self, path: str | Path, every_s: float = 10.0, out: TextIO | None = None,
                 indent: str = "  ", clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.every_s, self.out, self.indent = Path(path), every_s, out, indent
        self.clock = clock
        self.offset = 0
        self.partial = ""                          # a line whose end has not been written yet
        self.shown_at: dict[str, float] = {}       # tag -> when its last periodic line was shown
        self.held: dict[str, str] = {}             # tag -> its newest periodic line not shown

    def poll(self, final: bool = False) -> None:
        """Print what is new; ``final``: the job ended, so show each tag's held line too."""
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
        except FileNotFoundError:                  # the job has not opened its log yet
            text = ""
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        if final and self.partial:
            lines.append(self.partial)
            self.partial = ""
        now = self.clock()
        for line in lines:
            self.take(line.rstrip("\r"), now)
        if final:
            for tag in list(self.held):
                self.show(self.held.pop(tag))

    def take(self, line: str, now: float) -> None:
        match = PROGRESS.match(line)
        if not match or SKIP.match(line):
            return
        tag = match.group(1)
        if " eta " not in line:
            if tag in self.held:                   # the tag's last step before this line
                self.show(self.held.pop(tag))
            self.show(line)
        elif now - self.shown_at.get(tag, -self.every_s) >= self.every_s:
            self.shown_at[tag] = now
            self.held.pop(tag, None)
            self.show(line)
        else:
            self.held[tag] = line

    def show(self, line: str) -> None:
        print(self.indent + line, file=self.out or sys.stdout, flush=True)     # stdout as it is now


def terminal_progress(launcher: Any, prefix: str = "") -> tuple[Callable[[Any, Any], None],
                                                                Callable[[bool], None]]:
    """``(on_start, on_poll)`` for ``Launcher.run_plan``: "running <prefix><job> (log ...)" as a
    job starts, then, for a local job, its progress lines as it writes them (a debug job runs in
    the calling process and prints them itself)."""
    followers: list[LogFollower] = []

    def started(spec: Any, job: Any) -> None:
        print(f"running {prefix}{spec.name} (log {launcher.log_path(job)})", flush=True)
        followers[:] = [LogFollower(launcher.log_path(job))] if launcher.cluster == "local" else []

    def polled(done: bool) -> None:
        for follower in followers:
            follower.poll(final=done)

    return started, polled
