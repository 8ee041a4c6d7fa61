"""Run ``rtreg register`` out of process, stream its JSON-lines progress, cancel it cleanly.

Used by the Slicer modules (with PythonSlicer) and by tests (with ``sys.executable``).
The child runs in its own process group; cancelling kills the whole group and
removes the run's temporary folder, so nothing is left behind.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ENGINE_ROOT = Path(__file__).resolve().parent.parent
"""The folder that holds the ``rtreg`` package (put on the child's PYTHONPATH)."""


class RunFailed(RuntimeError):
    """The engine reported an error (its message names the problem and the fix) or died."""


class CliRun:
    """One ``python -m rtreg.cli register ... --progress jsonl`` child process (or ``register-series``).

    ``args`` are the subcommand's arguments without ``--out`` and ``--progress``; outputs go to
    ``self.out`` inside ``self.workdir`` (a temporary folder this run owns).
    """

    def __init__(self, args: Sequence[str], python: Optional[str] = None, workdir: Optional[Path] = None,
                 subcommand: str = "register"):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rtreg-run-"))
        self.out = self.workdir / "out"
        self.python = python or sys.executable
        self.command: List[str] = [self.python, "-m", "rtreg.cli", subcommand, *args, "--out", str(self.out),
                                   "--progress", "jsonl"]
        self.process: Optional[subprocess.Popen] = None
        self.events: "queue.Queue[Dict]" = queue.Queue()
        self.error: Optional[str] = None
        self.done: Optional[Dict] = None
        self.stderr_tail: List[str] = []
        self.cancelled = False

    def start(self) -> "CliRun":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ENGINE_ROOT)] + [p for p in [env.get("PYTHONPATH", "")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        kwargs = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=env, cwd=str(self.workdir), **kwargs)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        return self

    def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                continue

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-40:]

    def poll(self, on_progress: Callable[[float, str], None] = lambda f, m: None) -> Optional[int]:
        """Hand queued progress to ``on_progress``; the exit code once the child has ended, else None."""
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                break
            if ev.get("type") == "progress":
                on_progress(float(ev.get("fraction", 0.0)), str(ev.get("message", "")))
            elif ev.get("type") == "error":
                self.error = str(ev.get("message", "unknown error"))
            elif ev.get("type") == "done":
                self.done = ev
        return None if self.process is None else self.process.poll()

    def wait(self, on_progress: Callable[[float, str], None] = lambda f, m: None, interval_s: float = 0.1) -> Dict:
        """Block until the child ends; returns the ``done`` event or raises RunFailed."""
        import time
        while self.poll(on_progress) is None:
            time.sleep(interval_s)
        time.sleep(0.05)
        self.poll(on_progress)
        return self.result()

    def result(self) -> Dict:
        """The ``done`` event of a finished run, or RunFailed with the engine's own message."""
        code = self.process.returncode if self.process else None
        if self.cancelled:
            raise RunFailed("the registration was cancelled")
        if self.error or code != 0 or self.done is None:
            detail = self.error or "\n".join(self.stderr_tail[-10:]) or f"exit status {code}"
            raise RunFailed(detail)
        return self.done

    def cancel(self) -> None:
        """Kill the child and everything it started; remove the temporary folder."""
        self.cancelled = True
        p = self.process
        if p is not None and p.poll() is None:
            try:
                if os.name == "posix":
                    os.killpg(os.getpgid(p.pid), signal.SIGKILL)
                else:
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(p.pid)], capture_output=True)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait(timeout=30)
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
