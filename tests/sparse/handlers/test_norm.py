"""BatchNorm's synchronisation gate: statistics are shared across processes only in training, only
when the encoder asks for it (`sync_group` not False) and only with more than one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from spark_me.sparse.handlers import norm

from ._values import value_and_dense


@pytest.mark.parametrize(
    "training, group, world, synced",
    [(True, None, 2, True), (False, None, 2, False), (True, False, 2, False), (True, None, 1, False)],
)
def test_batchnorm_syncs_only_in_training_with_a_group_of_several(
    monkeypatch: pytest.MonkeyPatch, training: bool, group, world: int, synced: bool
) -> None:
    calls = []

    def fake_sync(rows, mean, var, weight, bias, momentum, eps, process_group):
        calls.append(process_group)
        return F.batch_norm(rows, mean, var, weight, bias, True, momentum, eps)

    monkeypatch.setattr(norm, "sync_batch_norm", fake_sync)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    x, _, _ = value_and_dense(channels=4)
    x.context.sync_group = group
    stats = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    F.batch_norm(x, *stats, torch.ones(4, dtype=torch.float64), None, training=training)
    assert calls == ([group] if synced else [])
