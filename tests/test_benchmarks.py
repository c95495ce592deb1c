"""The benchmarks a user runs on an accelerator, run here on the tiny config so that they work
when one is at hand: `benchmarks/train_step.py` (step time, model FLOPs, MFU)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_benchmark_runs_stage_3_and_counts_the_flops_xla_runs():
    """The tiny config's stage 3 (reflow: its batch is the teacher's couplings, not images) on 2
    devices: the step runs, and the model FLOPs it divides by (`flops.step_flops` at the
    benchmark's batch, not the stage-3 section's 16) agree with XLA's count of the compiled
    program per device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "-o", "stage=3",
                          "--batch", "4", "--steps", "1", "--peak-tflops", "1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ratio = float(re.search(r"= ([0-9.]+) x model FLOPs / devices", out.stdout).group(1))
    assert 0.95 < ratio < 1.25, out.stdout
    assert re.search(r"tiny stage-3 step, batch 4 .* on 2 x cpu: .* MFU [0-9.]+% of 2 x 1 TFLOP/s", out.stdout)
