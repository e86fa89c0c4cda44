import pytest
import torch
from torch import nn

from metaopt import WeightSpace
from tasks.weight_data import WeightDataError, WeightDataset, existing_shards, shard_path


def _dataset(n=6, seed=0):
    torch.manual_seed(seed)
    nets = [nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)) for _ in range(n)]
    ws = WeightSpace.from_modules(nets)
    meta = {"label": torch.arange(n), "split": torch.arange(n) % 3, "psnr": torch.rand(n)}
    return WeightDataset(ws.spec, [w[:, 0] for w in ws.weights], [b[:, 0] for b in ws.biases], meta, {"recipe": "test"})


def test_round_trip_through_shards(tmp_path):
    a, b = _dataset(6, 0), _dataset(4, 1)
    a.save_shard(shard_path(tmp_path, 0))
    b.save_shard(shard_path(tmp_path, 1))
    assert [p.name for p in existing_shards(tmp_path)] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    loaded = WeightDataset.load(tmp_path)
    assert len(loaded) == 10 and loaded.spec == a.spec and loaded.info == {"recipe": "test"}
    for got, want in zip(loaded.weights + loaded.biases, [torch.cat(p) for p in zip(a.weights + a.biases,
                                                                                      b.weights + b.biases)]):
        assert torch.equal(got, want)
    assert torch.equal(loaded.meta["label"], torch.cat([a.meta["label"], b.meta["label"]]))


def test_splits_and_weight_space():
    d = _dataset(6)
    test = d.split("test")
    assert len(test) == 2 and torch.equal(test.meta["label"], torch.tensor([2, 5]))
    ws = test.weight_space()
    assert ws.batch_size == 2 and ws.channels == 1 and ws.spec == d.spec
    assert torch.equal(ws.weights[0][:, 0], d.weights[0][d.meta["split"] == 2])
    with pytest.raises(ValueError, match="unknown split"):
        d.split("holdout")


def test_bad_files_fail_with_clear_errors(tmp_path):
    with pytest.raises(WeightDataError, match="no shard"):
        WeightDataset.load(tmp_path)
    _dataset().save_shard(shard_path(tmp_path, 0))
    shard_path(tmp_path, 1).write_bytes(b"not a shard")
    with pytest.raises(WeightDataError, match="shard-00001.*corrupt"):
        WeightDataset.load(tmp_path)
    ws = WeightSpace.from_modules([nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))])
    other = WeightDataset(ws.spec, [w[:, 0] for w in ws.weights], [b[:, 0] for b in ws.biases],
                          {"label": torch.zeros(1), "split": torch.zeros(1), "psnr": torch.zeros(1)})
    other.save_shard(shard_path(tmp_path, 1))
    with pytest.raises(WeightDataError, match="architecture"):
        WeightDataset.load(tmp_path)


def test_inconsistent_columns_rejected():
    d = _dataset(3)
    with pytest.raises(WeightDataError, match="metadata 'label'"):
        WeightDataset(d.spec, d.weights, d.biases, {"label": torch.zeros(2)})
