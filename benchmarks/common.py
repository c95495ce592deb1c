"""Timing helpers shared by the benchmarks: median wall time after warm-up, printed side by side."""
import statistics
import time


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, t_jax: float, t_torch: float, target: float | None = None) -> None:
    ratio = t_torch / t_jax
    goal = f"  (target >= {target:.2f}x: {'met' if ratio >= target else 'NOT met'})" if target else ""
    print(f"{name:<40} jax {t_jax * 1e3:9.1f} ms   torch {t_torch * 1e3:9.1f} ms   "
          f"speed-up {ratio:5.2f}x{goal}")


def load_codec(folder):
    """The trained codec folder a benchmark measures (exit with a hint when there is none)."""
    import sys
    from pathlib import Path

    from perco_jax.codec.codec import Codec

    if not Path(folder).is_dir():
        sys.exit(f"{folder} does not exist: run `make demo` first (it trains and exports the tiny codec)")
    return Codec.load(folder)
