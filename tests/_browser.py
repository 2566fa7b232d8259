"""Helpers for the dashboard's browser test: Chromium driven over its DevTools pipe, and
``backbeat-trio demo --web`` run as a subprocess."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "backbeat_trio"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def artifacts_dir(tmp_path: Path) -> Path:
    folder = os.environ.get("BACKBEAT_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path


def _high(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out; each
    message JSON ending in a NUL byte): enough to open a page, evaluate and take a screenshot."""

    def __init__(self, binary: str, profile: Path) -> None:
        # Chromium reads fd 3 and writes fd 4; the pipe ends are first moved above them so that
        # the redirections cannot overwrite one with the other (bash: dash refuses fds over 9)
        to_chrome_r, self._to_chrome = (_high(fd) for fd in os.pipe())
        self._from_chrome, from_chrome_w = (_high(fd) for fd in os.pipe())
        args = [
            binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--window-size=1200,1400",
            "about:blank",
        ]
        self.log = profile.parent / "chromium.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', "bash", *args],
                pass_fds=(to_chrome_r, from_chrome_w),
                stdout=log,
                stderr=log,
            )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.session = ""

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 20) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, _, self._buffer = self._buffer.partition(b"\0")
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError(f"no answer to {method} in {timeout} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page never showed {expression!r}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.session = ""
        # it may close the pipe before answering; it is killed below if still running
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


class Demo:
    """``backbeat-trio demo --web`` as a subprocess, its stdout read line by line."""

    def __init__(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("BACKBEAT_") or k == "BACKBEAT_NATS_SERVER"
        }
        self.proc = subprocess.Popen(
            [*CLI, "demo", "--plain", "--forever", "--web", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_line(self, prefix: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line

    def stop(self) -> tuple[int, str, str]:
        """SIGINT, then its exit code, the rest of its stdout and its stderr."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=20)
        self.reader.join(timeout=5)
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        assert self.proc.stderr is not None
        return code, "".join(rest), self.proc.stderr.read()
