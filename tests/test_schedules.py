"""Masking schedules: valid partitions on any grid, deterministic, with the intended patterns."""
import math

import numpy as np
import pytest

from perco_jax import schedules as S

SIZES = [(1, 1), (2, 3), (4, 4), (7, 5), (8, 8), (16, 16), (32, 32), (1, 9), (9, 1)]
STEPS = [1, 3, 8, 12]


def _all_groups(h, w):
    for name in S.SCHEDULES:
        for steps in (STEPS if name in S.STEPPED else [None]):
            for seed in ((0, 7) if name in ("random", "cosine") else (0,)):
                yield name, steps, seed, S.get_schedule(name, h, w, steps=steps, seed=seed)


@pytest.mark.parametrize("h,w", SIZES)
def test_every_schedule_is_a_partition(h, w):
    for name, steps, seed, g in _all_groups(h, w):
        where = f"{name} steps={steps} seed={seed} on {h}x{w}"
        assert g.shape == (h, w) and g.dtype == np.int32, where
        counts = np.bincount(g.ravel())
        # ids are 0..S-1 with none empty (so each position is in exactly one group)
        assert g.min() == 0 and (counts > 0).all(), where
        assert counts.sum() == h * w, where
        if name in S.STEPPED:
            assert len(counts) == min(steps, h * w), where
        again = S.get_schedule(name, h, w, steps=steps, seed=seed)
        np.testing.assert_array_equal(g, again, err_msg=where)


def test_checkerboard_patterns():
    g = S.checkerboard(5, 6)
    i, j = np.indices((5, 6))
    np.testing.assert_array_equal(g, (i + j) % 2)
    assert S.checkerboard(1, 1).max() == 0
    g4 = S.checkerboard4(6, 7)
    ii, jj = np.indices((6, 7))
    for gid, (pi, pj) in enumerate([(0, 0), (1, 1), (0, 1), (1, 0)]):
        np.testing.assert_array_equal(g4 == gid, (ii % 2 == pi) & (jj % 2 == pj))
    # the first two phases together form the even checkerboard
    np.testing.assert_array_equal(g4 <= 1, (ii + jj) % 2 == 0)
    # thin grids drop the empty phases: (0,0) then (0,1)
    np.testing.assert_array_equal(S.checkerboard4(1, 4), [[0, 1, 0, 1]])


def test_quincunx_is_hierarchical():
    h = w = 16
    g = S.quincunx(h, w)
    m = S.quincunx_levels(h, w)
    assert m == 4 and g.max() == 2 * m
    assert g[0, 0] == 0 and (g == 0).sum() == 1
    i, j = np.indices((h, w))
    s = 1 << m
    for level in range(m):
        half = s // 2
        diamond, square = 1 + 2 * level, 2 + 2 * level
        # diamond step: centres of the stride-s squares
        np.testing.assert_array_equal(g == diamond, (i % s == half) & (j % s == half))
        # after the square step the stride-s/2 lattice is complete
        np.testing.assert_array_equal(g <= square, (i % half == 0) & (j % half == 0))
        s = half
    # each last-level diamond position has its diagonal neighbours already sent
    for a, b in zip(*np.nonzero(g == 2 * m - 1)):
        for da in (-1, 1):
            for db in (-1, 1):
                if 0 <= a + da < h and 0 <= b + db < w:
                    assert g[a + da, b + db] < g[a, b]
    # non-power-of-two, non-square grids keep the same structure
    g = S.quincunx(7, 5)
    assert g[0, 0] == 0 and g[4, 4] == 1 and g[0, 4] == g[4, 0] == 2
    assert S.quincunx(1, 1).max() == 0


def test_qlds_power_law_and_spread():
    h = w = 32
    n = h * w
    for steps, alpha in [(8, 2.2), (12, 2.2), (6, 1.5)]:
        g = S.qlds(h, w, steps, alpha=alpha)
        ends = np.cumsum(np.bincount(g.ravel()))
        expected = [math.floor(n * (i / steps) ** alpha + 0.5) for i in range(1, steps + 1)]
        np.testing.assert_array_equal(ends, expected)
    # the R2 order visits every cell once and its first cells are well spread (no two adjacent)
    order = S.r2_order(h, w)
    assert sorted(order.tolist()) == list(range(n))
    first = np.stack(np.unravel_index(order[:11], (h, w)), 1)
    dist = np.abs(first[:, None] - first[None]).max(-1) + np.eye(11, dtype=int) * 99
    assert dist.min() >= 3
    # tiny grids: more steps than positions are clamped, groups stay non-empty
    assert np.bincount(S.qlds(2, 2, 8).ravel()).tolist() == [1, 1, 1, 1]


def test_random_and_cosine():
    h = w = 16
    n = h * w
    r0, r1 = S.random_order(h, w, 8, 0), S.random_order(h, w, 8, 1)
    assert not np.array_equal(r0, r1)
    assert np.bincount(r0.ravel()).tolist() == [32] * 8
    c = S.cosine(h, w, 8, 0)
    sizes = np.bincount(c.ravel())
    masked = [math.ceil(n * math.cos(math.pi / 2 * i / 8) - 1e-9) for i in range(1, 8)] + [0]
    np.testing.assert_array_equal(n - np.cumsum(sizes), masked)
    assert (np.diff(sizes) >= 0).all()  # MaskGIT's cosine sends few first, many last
    # cos(pi/3) = 0.5000000000000001 in float64: the exact count is used, N/2 masked after 2 of 3
    assert np.bincount(S.cosine(4, 4, 3, 0).ravel()).cumsum()[1] == 16 - 8
    # the permutation is fixed forever (not numpy-version dependent): pin a few values
    assert S.random_permutation(10, 0).tolist() == [8, 1, 2, 4, 0, 6, 7, 3, 9, 5]
    assert S.random_permutation(10, 12345).tolist() == [1, 9, 7, 2, 8, 5, 4, 0, 3, 6]
    assert sorted(S.random_permutation(1000, 3).tolist()) == list(range(1000))


def test_implicit_var():
    g = S.implicit_var(16, 16)
    i, j = np.indices((16, 16))
    np.testing.assert_array_equal(g == 0, (i % 4 == 0) & (j % 4 == 0))
    np.testing.assert_array_equal(g <= 1, (i % 2 == 0) & (j % 2 == 0))
    assert g.max() == 2
    assert S.implicit_var(1, 1).max() == 0
    assert S.implicit_var(2, 2).max() == 1   # the stride-2 scale adds nothing on 2 x 2
    assert S.implicit_var(3, 3).max() == 2


def test_registry():
    assert len(set(S.SCHEDULES)) == len(S.SCHEDULES)
    ids = [S.schedule_id(n) for n in (S.UNIFORM,) + S.SCHEDULES]
    assert len(set(ids)) == len(ids) and S.schedule_id(S.UNIFORM) == 0
    for n in (S.UNIFORM,) + S.SCHEDULES:
        assert S.schedule_name(S.schedule_id(n)) == n
    with pytest.raises(ValueError, match="known schedules: checkerboard"):
        S.get_schedule("zigzag", 4, 4)
    with pytest.raises(ValueError, match="not a schedule"):
        S.get_schedule("uniform", 4, 4)
    with pytest.raises(ValueError, match="steps"):
        S.get_schedule("qlds", 4, 4)
    with pytest.raises(ValueError):
        S.schedule_name(200)
    with pytest.raises(ValueError):
        S.checkerboard(0, 3)


def test_schedule_specs_parse_and_refuse_malformed_ones():
    from perco_jax.schedules import from_spec, parse_spec

    assert parse_spec("qlds:8") == ("qlds", 8, 0)
    assert parse_spec("random:8:3") == ("random", 8, 3)
    assert parse_spec("checkerboard") == ("checkerboard", 0, 0)
    assert parse_spec("uniform") == ("uniform", 0, 0)
    np.testing.assert_array_equal(from_spec("cosine:5:2", 6, 6), S.get_schedule("cosine", 6, 6, 5, 2))
    for bad in ("qlds", "qlds:x", "qlds:8:1", "checkerboard:4", "zigzag", "random:0", "random:8:70000", ""):
        with pytest.raises(ValueError):
            parse_spec(bad)
