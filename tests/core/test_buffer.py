"""D_model: FIFO ring buffer of model transitions."""

from __future__ import annotations

import numpy as np
import pytest

from dromo_ray.core.buffer import ReplayBuffer
from dromo_ray.core.types import NumpyBatch

OBS, ACT = 3, 2


def rows(start: int, n: int) -> NumpyBatch:
    """Rows whose every field encodes the row id (start ... start + n - 1)."""
    ids = np.arange(start, start + n, dtype=np.float32)
    return NumpyBatch(np.repeat(ids[:, None], OBS, 1), np.repeat(ids[:, None], ACT, 1) + 0.5, ids + 0.25,
                      np.repeat(ids[:, None], OBS, 1) + 1, (ids % 2).astype(np.float32), ids * 2)


def test_fifo_overwrite_order():
    buf = ReplayBuffer(10, OBS, ACT)
    buf.add(rows(0, 4))
    assert len(buf) == 4 and buf.ordered().rew.tolist() == [0.25, 1.25, 2.25, 3.25]
    buf.add(rows(4, 9))  # 13 rows in total: the oldest 3 are overwritten, wrapping around
    assert len(buf) == 10 and buf.total_added == 13
    assert (buf.ordered().obs[:, 0] == np.arange(3, 13)).all()
    buf.add(rows(13, 25))  # more than the capacity at once: only the newest 10 survive
    assert (buf.ordered().obs[:, 0] == np.arange(28, 38)).all()
    o = buf.ordered()
    np.testing.assert_array_equal(o.next_obs, o.obs + 1)
    np.testing.assert_array_equal(o.unc, o.obs[:, 0] * 2)


def test_sample_only_filled_rows_and_chunk_shapes():
    buf = ReplayBuffer(100, OBS, ACT)
    with pytest.raises(ValueError):
        buf.sample(1, np.random.default_rng(0))
    buf.add(rows(1, 7))
    s = buf.sample(1000, np.random.default_rng(0))
    assert set(s.obs[:, 0].tolist()) == set(range(1, 8))  # never an empty (zero) slot, every filled row
    np.testing.assert_array_equal(s.act[:, 0], s.obs[:, 0] + 0.5)  # fields stay aligned
    ch = buf.sample_chunk(4, 32, np.random.default_rng(1))
    assert ch.obs.shape == (128, OBS) and ch.act.shape == (128, ACT) and ch.next_obs.shape == (128, OBS)
    assert ch.rew.shape == ch.done.shape == ch.unc.shape == (128,)
    assert all(a.dtype == np.float32 for a in ch)


def test_add_rejects_bad_shapes():
    buf = ReplayBuffer(10, OBS, ACT)
    obs, act, rew, nxt, done, unc = rows(0, 3)
    good = NumpyBatch(obs, act, rew, nxt, done, unc)
    with pytest.raises(ValueError):
        buf.add(good._replace(act=np.zeros((3, ACT + 1), np.float32)))
    with pytest.raises(ValueError):
        buf.add(good._replace(rew=np.zeros((2,), np.float32)))
    assert len(buf) == 0


@pytest.mark.parametrize("n_added", [6, 23])
def test_state_round_trip_exact(n_added):
    buf = ReplayBuffer(10, OBS, ACT)
    buf.add(rows(0, n_added))
    state = buf.state_dict()
    assert state["obs"].shape[0] == min(n_added, 10)  # only the filled part
    clone = ReplayBuffer(10, OBS, ACT)
    clone.add(rows(100, 4))  # stale contents are replaced
    clone.load_state_dict(state)
    assert len(clone) == len(buf)
    for a, b in zip(buf.ordered(), clone.ordered(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(buf.sample(50, np.random.default_rng(3)), clone.sample(50, np.random.default_rng(3)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    buf.add(rows(50, 5))
    clone.add(rows(50, 5))  # continues writing at the same place
    for a, b in zip(buf.ordered(), clone.ordered(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        ReplayBuffer(11, OBS, ACT).load_state_dict(state)
