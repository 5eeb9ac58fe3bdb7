"""Progress per epoch on rank 0: a tqdm bar on a terminal, plain lines otherwise (SLURM logs)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class _Bar:
    def __init__(self, enabled: bool, desc: str, total: int, start: int, every: int):
        self.enabled, self.desc, self.total, self.n = enabled, desc, total, start
        self.every, self.t0, self.start = every, time.time(), start
        self.tty = enabled and getattr(sys.stderr, "isatty", lambda: False)()
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True) if self.tty else None

    def update(self, samples: int = 0, **values: float) -> None:
        self.n += 1
        if not self.enabled:
            return
        rate = (self.n - self.start) / max(time.time() - self.t0, 1e-9)
        shown = {k: f"{v:.4g}" for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(it_s=f"{rate:.2f}", **shown, refresh=False)
            self.bar.update(1)
        elif self.n % self.every == 0 or self.n == self.total:
            print(f"{self.desc} {self.n}/{self.total} {rate:.2f} it/s "
                  + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Progress:
    def __init__(self, enabled: bool, every: int = 50):
        self.enabled, self.every = enabled, every

    def __call__(self, phase: str, epoch: int, total: int, start: int = 0) -> _Bar:
        return _Bar(self.enabled, f"{phase} epoch {epoch + 1}", total, start, self.every)
