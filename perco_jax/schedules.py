"""Masking schedules for the entropy model: the order in which a grid of VQ indices is sent.

A schedule partitions an H x W index grid into S groups that are sent one after another; the
entropy model predicts the indices of group s from groups 0..s-1 (M2T, Mentzer et al. 2023;
MaskGIT, Chang et al. 2022). Every schedule here is a pure, deterministic function of its
arguments returning

    groups: np.ndarray int32 [H, W] with values 0..S-1,

every position in exactly one group and every group non-empty. Where a fixed pattern has no
positions on a small grid (e.g. a 1 x 1 grid has no second checkerboard phase), the empty groups
are dropped and the rest renumbered in order, so S can be smaller than the pattern's nominal
count. Schedules with a `steps` argument clamp it to H * W (a group needs at least one position).

Encoder and decoder rebuild the schedule from the bitstream header, so the results must not
depend on the platform or library versions: only exact integer arithmetic and IEEE-exact float
operations (multiply, add, fmod, floor) are used, plus a small epsilon where a rounding decision
follows a transcendental function (cos, pow) whose last bit libm does not guarantee.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

# Names as written in configs; "uniform" (no schedule: fixed-length coding of every index) is
# not a schedule but has a header id, so that a bitstream can say it was coded that way.
UNIFORM = "uniform"
SCHEDULES = ("checkerboard", "checkerboard4", "quincunx", "qlds", "random", "cosine", "implicit_var")
# Stable header ids: append only, never renumber (bitstreams in the wild depend on them).
_IDS = {UNIFORM: 0, "checkerboard": 1, "checkerboard4": 2, "quincunx": 3, "qlds": 4, "random": 5,
        "cosine": 6, "implicit_var": 7}
_NAMES = {v: k for k, v in _IDS.items()}
# Schedules whose number of groups is the caller's `steps` (the others have a fixed pattern).
STEPPED = ("qlds", "random", "cosine")

PHI2 = 1.32471795724474602596  # generalised golden ratio: the real root of x^3 = x + 1
_EPS = 1e-9                     # absorbs libm's last-bit differences before ceil / round


def _check_size(h: int, w: int) -> None:
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"grid size must be positive integers, got {h} x {w}")


def _compact(groups: np.ndarray) -> np.ndarray:
    """Renumbers group ids [H, W] to 0..S-1 keeping their order (drops empty groups)."""
    _, inverse = np.unique(groups, return_inverse=True)
    return inverse.reshape(groups.shape).astype(np.int32)


def _from_order(order: np.ndarray, h: int, w: int, cumulative: np.ndarray) -> np.ndarray:
    """groups [H, W] from a raster-index order [N] and cumulative group ends [S] (last = N)."""
    rank = np.empty(h * w, np.int64)
    rank[order] = np.arange(h * w)
    return np.searchsorted(cumulative, rank, side="right").astype(np.int32).reshape(h, w)


def _nonempty_cumulative(ends: np.ndarray, n: int) -> np.ndarray:
    """Cumulative group ends [S] made strictly increasing from >= 1 to exactly n.

    Needs S <= n. A forward pass lifts each end to previous + 1, a backward pass caps end i at
    n - (S - 1 - i) so the later groups keep a position each; neither pass undoes the other.
    """
    ends = np.asarray(ends, np.int64).copy()
    s = len(ends)
    ends[-1] = n
    prev = 0
    for i in range(s):
        ends[i] = max(ends[i], prev + 1)
        prev = ends[i]
    for i in range(s):
        ends[i] = min(ends[i], n - (s - 1 - i))
    return ends


def _clamp_steps(steps, n: int) -> int:
    if steps is None or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return min(int(steps), n)


# ----------------------------------------------------------------------------- fixed patterns

def checkerboard(h: int, w: int) -> np.ndarray:
    """Two groups [H, W]: the (i + j) even positions, then the odd ones (1 group on a 1 x 1 grid)."""
    _check_size(h, w)
    i, j = np.indices((h, w))
    return _compact((i + j) % 2)


# The four (i % 2, j % 2) phases: the stride-2 lattice, its diagonal complement (together a
# checkerboard, each position seeing its 4 diagonal neighbours), then the two remaining phases
# (each position now sees its 4 axis neighbours).
_PHASES4 = ((0, 0), (1, 1), (0, 1), (1, 0))


def checkerboard4(h: int, w: int) -> np.ndarray:
    """Four groups [H, W], one per (i % 2, j % 2) phase in the order (0,0), (1,1), (0,1), (1,0)."""
    _check_size(h, w)
    i, j = np.indices((h, w))
    groups = np.zeros((h, w), np.int64)
    for g, (pi, pj) in enumerate(_PHASES4):
        groups[(i % 2 == pi) & (j % 2 == pj)] = g
    return _compact(groups)


def quincunx_levels(h: int, w: int) -> int:
    """m, the number of quincunx refinement levels: the smallest m with max(H, W) <= 2^m, so that
    the coarse stride-2^m lattice is the single position (0, 0)."""
    _check_size(h, w)
    return (max(h, w) - 1).bit_length()


def quincunx(h: int, w: int) -> np.ndarray:
    """Hierarchical quincunx (diamond-square) refinement; groups [H, W], 1 + 2m groups at most.

    Definition: with m = quincunx_levels(h, w) (the smallest m with max(H, W) <= s = 2^m),
    group 0 is the coarse lattice {i % s == 0, j % s == 0}, i.e. the single position (0, 0). Then for each
    stride s = 2^m, ..., 2 two groups refine the stride-s lattice to stride s/2:
      - diamond step: the square centres {i % s == s/2, j % s == s/2} (the stride-s lattice plus
        these is a quincunx lattice: each new point has 4 diagonal neighbours already sent);
      - square step: the edge midpoints {i % s == s/2, j % s == 0} and {i % s == 0, j % s == s/2}
        (each has 4 axis neighbours at distance s/2 already sent).
    After the last level (s = 2) every position is sent. Levels empty on thin grids are dropped.
    """
    m = quincunx_levels(h, w)
    i, j = np.indices((h, w))
    groups = np.full((h, w), -1, np.int64)
    s = 1 << m
    groups[(i % s == 0) & (j % s == 0)] = 0
    g = 1
    while s >= 2:
        half = s // 2
        ri, rj = i % s, j % s
        groups[(ri == half) & (rj == half)] = g
        groups[((ri == half) & (rj == 0)) | ((ri == 0) & (rj == half))] = g + 1
        g += 2
        s = half
    assert (groups >= 0).all()
    return _compact(groups)


def implicit_var(h: int, w: int) -> np.ndarray:
    """Implicit hierarchical next-scale (VAR-like) order; groups [H, W], up to 3 groups.

    Group 0: the stride-4 sub-grid {i % 4 == 0, j % 4 == 0} (a 1/4-scale view of the grid);
    group 1: the stride-2 positions not yet sent (completing the 1/2 scale); group 2: all the
    rest (full scale). Unlike VAR there are no separate coarse token maps: the coarse scales are
    sub-grids of the one index grid, so the rate is that of the grid alone. On grids too small
    for a scale to add positions (e.g. 2 x 2, whose stride-2 sub-grid is the single (0, 0)) that
    group is dropped: a 1 x 1 grid has 1 group, a 2 x 2 grid 2.
    """
    _check_size(h, w)
    i, j = np.indices((h, w))
    groups = np.full((h, w), 2, np.int64)
    groups[(i % 2 == 0) & (j % 2 == 0)] = 1
    groups[(i % 4 == 0) & (j % 4 == 0)] = 0
    return _compact(groups)


# ----------------------------------------------------------------------------- ordered schedules

def r2_order(h: int, w: int) -> np.ndarray:
    """Raster indices [H*W] in R2 low-discrepancy order (first visit of each cell).

    Point n = 0, 1, 2, ... is (frac(0.5 + n / phi2), frac(0.5 + n / phi2^2)) in [0, 1)^2,
    quantised to cell (floor(x * H), floor(y * W)); repeats are skipped and the sequence is
    continued until every cell has been visited (about 2N points suffice in practice).
    """
    _check_size(h, w)
    n_cells = h * w
    a1, a2 = 1.0 / PHI2, 1.0 / (PHI2 * PHI2)
    count = 4 * n_cells + 16
    while True:
        n = np.arange(count, dtype=np.float64)
        x = np.mod(0.5 + n * a1, 1.0)
        y = np.mod(0.5 + n * a2, 1.0)
        cells = np.minimum(np.floor(x * h), h - 1).astype(np.int64) * w + \
            np.minimum(np.floor(y * w), w - 1).astype(np.int64)
        _, first = np.unique(cells, return_index=True)
        if len(first) == n_cells:
            return cells[np.sort(first)]
        if count >= 1 << 24:  # never seen in practice; keeps the function total for any size
            seen = cells[np.sort(first)]
            rest = np.setdiff1d(np.arange(n_cells), seen)
            return np.concatenate([seen, rest])
        count *= 2


def qlds(h: int, w: int, steps: int, alpha: float = 2.2) -> np.ndarray:
    """QLDS of M2T: the R2 order split by a power law; groups [H, W], min(steps, H*W) groups.

    Group i (1-based) ends at cumulative count round(N * (i / S)^alpha) (round half up), so the
    first groups are small (few, well spread positions with little context) and the last ones
    large; ends are adjusted minimally so that every group is non-empty.
    """
    _check_size(h, w)
    n = h * w
    s = _clamp_steps(steps, n)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    ends = np.array([math.floor(n * (i / s) ** alpha + 0.5 + _EPS) for i in range(1, s + 1)])
    return _from_order(r2_order(h, w), h, w, _nonempty_cumulative(ends, n))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser [N] uint64 -> [N] uint64 (wrapping integer arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def random_permutation(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) [n] int64, fixed forever.

    Sorting positions by a SplitMix64 hash of (seed, position) rather than using numpy's
    Generator: numpy does not promise the same streams across versions, and an encoder and a
    decoder with different numpy versions must still agree.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & (2**64 - 1)) ^ _splitmix64(np.arange(n, dtype=np.uint64)))
    return np.argsort(key, kind="stable")


def random_order(h: int, w: int, steps: int, seed: int) -> np.ndarray:
    """A seeded random order split into min(steps, H*W) near-equal groups [H, W].

    Group sizes differ by at most one; the first N mod S groups get the extra position.
    """
    _check_size(h, w)
    n = h * w
    s = _clamp_steps(steps, n)
    base, extra = divmod(n, s)
    ends = np.cumsum([base + (1 if i < extra else 0) for i in range(s)])
    return _from_order(random_permutation(n, seed), h, w, ends)


def cosine(h: int, w: int, steps: int, seed: int) -> np.ndarray:
    """MaskGIT's cosine schedule over a seeded random order; groups [H, W], min(steps, H*W) groups.

    After step i of S, ceil(N * cos(pi/2 * i/S)) positions are still masked (N before step 1,
    0 after step S), so the first steps send few positions and the last ones many. Ends are
    adjusted minimally so that every group is non-empty.
    """
    _check_size(h, w)
    n = h * w
    s = _clamp_steps(steps, n)
    # cos(pi/3) is 0.5000000000000001 in float64: without the epsilon ceil would count one more.
    masked = [math.ceil(n * math.cos(math.pi / 2 * i / s) - _EPS) for i in range(1, s)] + [0]
    ends = np.array([n - m for m in masked])
    return _from_order(random_permutation(n, seed), h, w, _nonempty_cumulative(ends, n))


# ----------------------------------------------------------------------------- registry

_FIXED: dict[str, Callable[[int, int], np.ndarray]] = {
    "checkerboard": checkerboard, "checkerboard4": checkerboard4, "quincunx": quincunx,
    "implicit_var": implicit_var}


def get_schedule(name: str, h: int, w: int, steps: int | None = None, seed: int = 0) -> np.ndarray:
    """groups [H, W] int32 of the schedule `name` (one of SCHEDULES).

    `steps` is required for the stepped schedules (qlds, random, cosine) and ignored by the fixed
    patterns; `seed` is used by random and cosine only.
    """
    if name in _FIXED:
        return _FIXED[name](h, w)
    if name == "qlds":
        return qlds(h, w, steps)
    if name == "random":
        return random_order(h, w, steps, seed)
    if name == "cosine":
        return cosine(h, w, steps, seed)
    raise ValueError(f"unknown masking schedule {name!r}; known schedules: {', '.join(SCHEDULES)}"
                     + (" ('uniform' is fixed-length coding, not a schedule)" if name == UNIFORM else ""))


def parse_spec(spec: str) -> tuple[str, int, int]:
    """(name, steps, seed) of a schedule spec as written in configs and on the command line:
    "name" for the fixed patterns (and "uniform"), "name:steps" or "name:steps:seed" for the
    stepped ones (qlds:8, random:8:3). steps and seed are 0 where they do not apply."""
    parts = str(spec).split(":")
    name = parts[0]
    if name != UNIFORM and name not in SCHEDULES:
        raise ValueError(f"unknown masking schedule {name!r} in {spec!r}; known: {', '.join((UNIFORM,) + SCHEDULES)}")
    seeded = name in ("random", "cosine")
    if len(parts) != (1 if name not in STEPPED else 2) and not (seeded and len(parts) == 3):
        form = f"{name}:STEPS[:SEED]" if seeded else f"{name}:STEPS" if name in STEPPED else name
        raise ValueError(f"schedule spec {spec!r}: write it as {form}")
    try:
        nums = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"schedule spec {spec!r}: steps and seed must be integers") from None
    steps, seed = (nums + [0, 0])[:2]
    if name in STEPPED and not 1 <= steps <= 0xFFFF or not 0 <= seed <= 0xFFFF:
        raise ValueError(f"schedule spec {spec!r}: need 1 <= steps <= 65535 and 0 <= seed <= 65535")
    return name, steps, seed


def spec_string(name: str, steps: int = 0, seed: int = 0) -> str:
    """The spec of (name, steps, seed), the inverse of parse_spec: "qlds:8", "random:8:3", "quincunx"."""
    parts = [name] + ([str(steps)] if name in STEPPED else []) + ([str(seed)] if name in ("random", "cosine") else [])
    spec = ":".join(parts)
    parse_spec(spec)  # (ValueError for what it refuses)
    return spec


def from_spec(spec: str, h: int, w: int) -> np.ndarray:
    """groups [H, W] of a schedule spec (see parse_spec); "uniform" has no groups (ValueError)."""
    name, steps, seed = parse_spec(spec)
    return get_schedule(name, h, w, steps or None, seed)


def num_groups(groups: np.ndarray) -> int:
    """S, the number of groups of a schedule's groups [H, W]."""
    return int(groups.max()) + 1


def schedule_id(name: str) -> int:
    """Stable small integer for the bitstream header (0 is 'uniform', i.e. no schedule)."""
    if name not in _IDS:
        raise ValueError(f"unknown masking schedule {name!r}; known: {', '.join((UNIFORM,) + SCHEDULES)}")
    return _IDS[name]


def schedule_name(sid: int) -> str:
    """Inverse of schedule_id; ValueError for unknown ids."""
    if sid not in _NAMES:
        raise ValueError(f"unknown masking schedule id {sid}; known ids: "
                         + ", ".join(f"{i}={n}" for i, n in sorted(_NAMES.items())))
    return _NAMES[sid]
