"""Progress reporting: the library calls a callback; the CLI draws it as a bar."""

from __future__ import annotations

from typing import Callable

# progress(done_units, total_units, message) — units are whatever the caller says (bytes, tensors).
ProgressFn = Callable[[int, int, str], None]


def null_progress(done: int, total: int, message: str = "") -> None:
    return None


class ClickBar:
    """A ProgressFn drawn with click.progressbar (bytes, rate, ETA); a no-op when `enabled` is false."""

    def __init__(self, label: str, enabled: bool = True, unit_bytes: bool = True):
        self.label = label
        self.enabled = enabled
        self.unit_bytes = unit_bytes
        self._bar = None
        self._done = 0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        import click

        if self._bar is None:
            self._bar = click.progressbar(length=max(total, 1), label=self.label, file=None, show_pos=not self.unit_bytes, item_show_func=lambda _: message)
            self._bar.__enter__()
        self._bar.label = f"{self.label} {message}".strip()[:60]
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
