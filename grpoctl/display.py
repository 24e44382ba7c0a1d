"""What `loop` shows on stderr: a rich live display on a terminal, log lines otherwise.

stdout is never touched, so a loop can sit in a pipeline. `NullDisplay` is --quiet.
"""

from __future__ import annotations

import sys
import time

SHOWN = (("reward_mean", "reward", "{:.3f}"), ("accuracy", "acc", "{:.3f}"),
         ("zero_adv_frac", "zero-adv", "{:.2f}"), ("loss", "loss", "{:+.4f}"),
         ("clip_fraction", "clip", "{:.3f}"), ("entropy", "entropy", "{:.3f}"),
         ("response_length", "len", "{:.1f}"), ("step_s", "s/step", "{:.2f}"))


def format_metrics(metrics: dict) -> str:
    parts = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in SHOWN
             if metrics.get(key) is not None]
    return "  ".join(parts)


class NullDisplay:
    def log(self, message: str) -> None: ...
    def start(self, total: int, first: int = 0) -> None: ...
    def stage(self, step: int, name: str) -> None: ...
    def step_done(self, metrics: dict) -> None: ...
    def eval_done(self, result: dict) -> None: ...
    def stop(self) -> None: ...


class LogDisplay(NullDisplay):
    """One plain line per step and per evaluation (stderr is a file or a pipe)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.total = 0

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def start(self, total: int, first: int = 0) -> None:
        self.total = total

    def step_done(self, metrics: dict) -> None:
        self.log(f"step {metrics['step']}/{self.total}  {format_metrics(metrics)}")

    def eval_done(self, result: dict) -> None:
        self.log(f"eval step {result['step']}: mean@{result['k']} {result['mean_at_k']:.3f}  "
                 f"pass@{result['k']} {result['pass_at_k']:.3f}  ({result['prompts']} prompts)")


class RichDisplay(LogDisplay):
    """Progress bars for the steps and the stage in flight, and the latest metrics."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console if console is not None else Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[info]}"), console=self.console)
        self.task = None

    def log(self, message: str) -> None:
        """One plain line, "HH:MM:SS message", above the progress bars.

        Not console.log: that adds a column with this file's name and line on the
        right, and reads the message as markup (a "[x]" in a path would vanish).
        """
        from rich.text import Text

        self.console.print(Text.assemble((time.strftime("%H:%M:%S "), "log.time"), message),
                           soft_wrap=True)

    def start(self, total: int, first: int = 0) -> None:
        self.total = total
        self.progress.start()
        self.task = self.progress.add_task("steps", total=total, completed=first, info="")

    def stage(self, step: int, name: str) -> None:
        self.progress.update(self.task, description=f"step {step}: {name:<10}")

    def step_done(self, metrics: dict) -> None:
        self.progress.update(self.task, advance=1, info=format_metrics(metrics))

    def eval_done(self, result: dict) -> None:
        super().eval_done(result)

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()


def make_display(quiet: bool):
    if quiet:
        return NullDisplay()
    return RichDisplay() if sys.stderr.isatty() else LogDisplay()
