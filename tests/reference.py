"""Helpers for parity tests: randomise PyTorch reference models and compare outputs."""
import contextlib
import math
import signal

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with noise so no zero-init hides a mapping bug.

    Matrices get N(0, 1/fan_in) (activations stay O(1), so float32 comparisons stay well
    conditioned); vectors get N(0, std^2); norm scales (1-D *norm*.weight) get 1 + N(0, std^2).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * noise)
            else:
                p.copy_(std * noise)
    return module.eval()


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fails the test (instead of hanging it) if the block runs longer than `seconds`."""
    def handler(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
