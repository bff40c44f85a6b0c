"""Visible steps with a spinner and elapsed time (rich), quiet when asked."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Steps:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True)
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.quiet or not sys.stderr.isatty():
            # Not a terminal: one line per finished step, nothing for a step that fails,
            # so an error stays the only line a script sees.
            yield
        else:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                          console=self.console, transient=True) as prog:
                prog.add_task(name, total=None)
                yield
        dt = time.perf_counter() - t0
        self.timings[name] = round(dt, 2)
        if not self.quiet:
            self.console.print(f"[green]✓[/green] {name} [dim]({dt:.1f}s)[/dim]")
