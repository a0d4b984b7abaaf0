"""A command run on a pseudo-terminal, as an operator runs it: its output as the screen shows it, and keys
(Ctrl+C) sent through the terminal, so the terminal's line discipline signals its foreground process group."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CTRL_C = b"\x03"


def _controlling_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class TerminalProcess:
    """``python -m clobjob ARGS`` on a fresh pty of ``columns`` × 40, in its own session."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], *, columns: int = 100) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        self.master, self.raw = master, b""
        self.process = subprocess.Popen([sys.executable, "-m", "clobjob", *args], stdin=slave, stdout=slave,
                                        stderr=slave, env={**env, "COLUMNS": str(columns)}, cwd=REPO,
                                        start_new_session=True, preexec_fn=_controlling_terminal)
        os.close(slave)

    def _read(self, timeout_s: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # the other side closed (EIO)
            return False
        self.raw += chunk
        return bool(chunk)

    def expect(self, pattern: str, timeout_s: float = 60) -> re.Match[str]:
        """Wait until the output matches ``pattern`` (a regex over the raw text)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = re.search(pattern, self.text)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen within {timeout_s}s; output:\n{self.screen()}")
            if not self._read(min(0.5, max(deadline - time.monotonic(), 0.01))) and self.process.poll() is not None:
                while self._read(0.1):
                    pass
                if not re.search(pattern, self.text):
                    raise AssertionError(f"{pattern!r} not seen; exited {self.process.returncode}:\n{self.screen()}")

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout_s: float = 60) -> int:
        """The exit code, reading the output to the end."""
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"still running after {timeout_s}s:\n{self.screen()}")
            self._read(0.2)
        while self._read(0.2):
            pass
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        self.kill()
        os.close(self.master)

    @property
    def text(self) -> str:
        return self.raw.decode(errors="replace")

    def screen(self) -> list[str]:
        """The lines as the terminal shows them: ``\\r`` returns to the line start, ``ESC[K`` clears to its end,
        ``ESC[H ESC[2J`` clears the screen; other escapes (colours) are dropped."""
        lines: list[str] = []
        line, column = [], 0
        for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]", self.text):
            if token == "\n":
                lines.append("".join(line).rstrip())
                line, column = [], 0
            elif token == "\r":
                column = 0
            elif token == "\x1b[K":
                del line[column:]
            elif token == "\x1b[2J":
                lines, line, column = [], [], 0
            elif token.startswith("\x1b"):
                continue
            else:
                if column < len(line):
                    line[column] = token
                else:
                    line.append(token)
                column += 1
        if line:
            lines.append("".join(line).rstrip())
        return lines
