"""Stopping cleanly when the scheduler asks: a signal (SIGUSR1/SIGTERM) or a STOP file in the run dir.

The batch script turns SLURM's time-limit warning into a STOP file, so the request reaches the trainer
whatever sits between them (torchrun, srun); a signal sent to the trainer itself works too. All ranks
agree on the step to stop at through one tiny host-side (gloo) all-reduce per step.
"""

from __future__ import annotations

import signal
from pathlib import Path

from hybrid_train.parallel import any_rank

STOP_FILE = "STOP"


class StopRequest:
    def __init__(self, run_dir: Path, group=None, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.stop_file = run_dir / STOP_FILE
        self.group = group  # the host-side group the ranks agree through (None: the default group)
        self.reason: str | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank got a signal or the STOP file exists."""
        if self.reason is None and self.stop_file.exists():
            self.reason = f"{self.stop_file} exists"
        (stop,) = any_rank([self.reason is not None], self.group)
        if stop and self.reason is None:
            self.reason = "another rank was asked to stop"
        return stop

    def consume(self, is_main: bool) -> None:
        """After the stop checkpoint: remove the STOP file so the resumed job runs on."""
        if is_main:
            self.stop_file.unlink(missing_ok=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
