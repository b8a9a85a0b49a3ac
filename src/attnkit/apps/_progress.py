"""One progress helper for every training loop.

On a terminal it is a tqdm bar (when tqdm is installed). Anywhere else - a log file, CI, a
pipe - a bar would write thousands of ``\\r`` updates into one line, so it prints a plain line
every ``every`` steps instead (and at the last step)::

    translate train: step 60/600 (10%), loss 0.412, 3.1 s
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Progress of ``total`` steps: a tqdm bar on a terminal, periodic lines elsewhere.

    Args:
        total: the number of steps of the whole run.
        desc: what is running, e.g. ``"translate train"``.
        enabled: False prints nothing at all (``--quiet``).
        initial: steps already done (a resumed run).
        every: steps between plain lines; default ``total / 10``.
        stream: where to write (default ``sys.stderr``).
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, initial: int = 0,
                 every: int | None = None, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.step, self.every = initial, every or max(1, total // 10)
        self.stream = sys.stderr if stream is None else stream
        self.postfix: dict = {}
        self._started = time.perf_counter()
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional: fall back to lines
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                                 file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by ``n`` steps; ``postfix`` values (e.g. ``loss=0.41``) are shown too."""
        self.step += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()},
                                      refresh=False)
            self._bar.update(n)
        elif self.step % self.every == 0 or self.step == self.total:
            extras = "".join(f", {k} {_fmt(v)}" for k, v in self.postfix.items())
            seconds = time.perf_counter() - self._started
            print(f"{self.desc}: step {self.step}/{self.total} "
                  f"({self.step / max(self.total, 1):.0%}){extras}, {seconds:.1f} s",
                  file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
