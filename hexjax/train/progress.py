"""A progress bar for training steps: loss, tokens/s, step time, MFU and ETA.

On a terminal it is one live bar (rich); otherwise (a pipe, a log file, CI)
it prints one line per step, which keeps logs readable.
"""

from __future__ import annotations

import sys


def step_line(m: dict) -> str:
    """One step's figures as a line (``m`` from ``Trainer.step`` plus ``step``, ``tokens_per_s``, ``mfu``)."""
    return (f"step {m['step']:>5}  loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  lr {m['lr']:.3g}  "
            f"{m['tokens_per_s']:.0f} tok/s  {m['seconds']:.2f} s/step"
            + (f"  mfu {100 * m['mfu']:.3g}%" if m.get("mfu") is not None else ""))


class TrainProgress:
    """``with TrainProgress(total_steps, done) as bar: bar.update(metrics)`` after every step."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True, live: bool | None = None, echo=None):
        self.total, self.done, self.enabled = total, done, enabled
        self.live = sys.stdout.isatty() if live is None else live
        self.echo = echo or print
        self._progress = None

    def __enter__(self):
        if self.enabled and self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[figures]}"), TimeRemainingColumn())
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.done,
                                                 figures="compiling the stage programs...")
        return self

    def update(self, m: dict) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            self.echo(step_line(m))
            return
        figures = (f"loss {m['loss']:.4f}  {m['tokens_per_s']:.0f} tok/s  {m['seconds']:.2f} s/step"
                   + (f"  mfu {100 * m['mfu']:.3g}%" if m.get("mfu") is not None else ""))
        self._progress.update(self._task, completed=m["step"], figures=figures)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False
