"""Preemption signals: SIGTERM / SIGUSR1 (and Ctrl-C) become a flag the training loop polls,
and the exit codes a requeue wrapper reads after the checkpoint is saved."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist

# Exit codes after a signal-triggered save. 75 (EX_TEMPFAIL) tells a requeue wrapper to start
# the job again; 143 is what a shell reports for a process ended by SIGTERM (128 + 15).
EXIT_REQUEUE = 75
EXIT_TERMINATED = 143
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it (128 + SIGINT)
_EXIT_CODES = {signal.SIGUSR1: EXIT_REQUEUE, signal.SIGTERM: EXIT_TERMINATED, signal.SIGINT: EXIT_INTERRUPTED}


class PreemptionHandler:
    """SIGTERM / SIGUSR1 -> a flag the loop polls; every rank then saves and exits together.

    SLURM sends these before preemption or the time limit (`--signal=USR1@90`), torchrun
    forwards SIGTERM to its workers. The handler only records the signal: saving from inside
    a signal handler could interrupt a collective half-way. Poll `should_stop()` once per
    optimizer step on every rank; it is a collective (MAX over ranks) so no rank is left
    waiting in the next all-reduce. Then save and `sys.exit(handler.exit_code)`.

        with PreemptionHandler() as stop:
            for batch in loader:
                ...step...
                if stop.should_stop():
                    save_checkpoint(...); sys.exit(stop.exit_code)
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = signals
        self.received: int = 0  # local: last signal number seen by this process, 0 if none
        self.agreed: int = 0  # after should_stop(): the signal every rank acts on
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            # A second Ctrl-C means "now": stop without the checkpoint (the previous one stays).
            if self.received:
                raise KeyboardInterrupt
            # os.write, not print: a handler can run while print holds stdout's lock.
            os.write(2, b"\nCtrl-C: saving a checkpoint after this step (Ctrl-C again: stop now)\n")
        self.received = max(self.received, signum)

    def install(self) -> "PreemptionHandler":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def should_stop(self) -> bool:
        """True on every rank if any rank got a signal (collective; call on all ranks)."""
        flag = self.received
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([flag], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        self.agreed = flag
        return flag != 0

    @property
    def exit_code(self) -> int:
        """EXIT_REQUEUE after SIGUSR1, EXIT_TERMINATED after SIGTERM (SIGTERM wins a tie)."""
        return _EXIT_CODES.get(signal.Signals(self.agreed), 128 + self.agreed) if self.agreed else 0
