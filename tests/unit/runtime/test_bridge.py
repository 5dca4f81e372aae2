"""split_world refuses what cannot split, naming the setting, before it touches the network (the split itself, the
bridge and its timeouts run in tests/distributed/test_weight_transfer.py)."""

import pytest

from megatron_s2d.errors import S2DError
from megatron_s2d.runtime.bridge import split_world


@pytest.fixture
def launched(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_PORT", "1")  # never reached: every case fails first


def test_a_bare_process_cannot_separate(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(S2DError, match="rollout.placement = 'separate' needs a launched job.*RANK, WORLD_SIZE"):
        split_world(1, 10.0)


@pytest.mark.parametrize("n", [0, 4, 5])
def test_generation_ranks_leave_at_least_one_trainer(launched, n):
    with pytest.raises(S2DError, match=rf"rollout.generation_ranks = {n}: .* between 1 and 3 in a job of 4 ranks"):
        split_world(n, 10.0)


def test_sync_timeout_must_be_positive(launched):
    with pytest.raises(S2DError, match="rollout.sync_timeout_s = 0"):
        split_world(2, 0)
