"""Where a training step's time goes: :class:`PhaseTimer` sums wall-clock seconds per named phase (generation,
log-probs, reward scoring, backward, ...), which the trainers log as ``seconds_{phase}`` in ``metrics.jsonl``."""
import time
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch


class PhaseTimer:
    """Seconds per named phase, each phase counting its own time only (a phase nested in another is not counted in
    the outer one as well). :meth:`pop` returns the sums since the last pop. On a CUDA device each phase ends by
    waiting for the device, so a phase counts the kernels it launched rather than their launch."""

    def __init__(self, device: Optional[torch.device] = None):
        self.synchronize = device is not None and torch.device(device).type == "cuda"
        self.sums, self.nested = {}, []

    @contextmanager
    def phase(self, name: str):
        self.nested.append(0.0)  # seconds of the phases opened inside this one
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            own = elapsed - self.nested.pop()
            if self.nested:
                self.nested[-1] += elapsed
            self.sums[name] = self.sums.get(name, 0.0) + own

    def pop(self) -> dict:
        """``{phase: seconds}`` since the last call, in the order the phases first ran."""
        sums, self.sums = self.sums, {}
        return sums


def timed(timer: Optional[PhaseTimer], name: str):
    """``timer.phase(name)``, or a context that times nothing when ``timer`` is None."""
    return nullcontext() if timer is None else timer.phase(name)
