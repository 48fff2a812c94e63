"""A progress line with rate and ETA on stderr: redrawn in place on a terminal, one line every
``interval`` seconds otherwise (CI logs, pipes)."""
import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None, interval: float = 10.0,
                 width: int = 24):
        self.total = max(0, int(total))
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self._last_print = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self, note: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        share = self.done / self.total if self.total else 1.0
        filled = int(round(share * self.width))
        rate = elapsed / self.done if self.done else None
        eta = "ETA --:--" if rate is None else f"ETA {format_duration(rate * (self.total - self.done))}"
        speed = "" if rate is None else f"  {rate:.2f} s/image"
        text = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{100 * share:5.1f}%  elapsed {format_duration(elapsed)}  {eta}{speed}")
        return f"{text}  {note}" if note else text

    def update(self, count: int = 1, note: str = "") -> None:
        self.done += count
        now = time.perf_counter()
        if self._tty:
            self.stream.write("\r" + self.line(note)[:200].ljust(120))
            self.stream.flush()
        elif now - self._last_print >= self.interval or self.done >= self.total:
            self._last_print = now
            self.stream.write(self.line(note) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
