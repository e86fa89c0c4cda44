"""Domain adaptation end to end on a tiny digit-CNN zoo (seconds on CPU): the table, the classifier
rebuilt from the zoo's record, equivariance of every adapter, that adaptation actually helps on an
easy shift, and clear errors on data that is not a classifier zoo."""

import json
import math

import pytest
import torch

from meta_train.standalone.__main__ import main
from meta_train.standalone.adapt import classifier_params, matched_logits, parse_shift, run_adapt, source_classifier
from meta_train.standalone.edit import EDITORS, ResidualEditor, build_editor
from meta_train.standalone.harness import ModelConfig, StandaloneError, TrainConfig, load_splits
from meta_train.standalone.smalldata import split_column
from metaopt import random_hidden_perms
from tasks.data import load_digits
from tasks.weight_data import WeightDataset, shard_path

from _standalone_data import FAST, classifier_zoo, digits_folder, synthetic_zoo

TINY = ModelConfig(hidden_channels=4, num_layers=2, head_hidden=16)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    torch.set_num_threads(1)
    return classifier_zoo(8, 4, 4, steps=150)


@pytest.fixture(scope="module")
def zoo_dir(zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cnn_zoo")
    zoo.save_shard(shard_path(folder, 0))
    return folder


def test_adapt_end_to_end(zoo, zoo_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["adapt", "--data", str(zoo_dir), "--out", str(out), "--finetune-steps", "2", *FAST]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in payload["rows"]] == [*EDITORS, "unadapted", "fine-tune 2 steps"]
    assert payload["shift"] == "rot90" and payload["classifier"] == "cnn[1x8x8,c4-4,relu]"
    for row in payload["rows"]:
        for key in ("test_target_accuracy", "test_source_accuracy", "test_gain", "test_improved_fraction"):
            assert math.isfinite(row[key]) and -1 <= row[key] <= 1, (row["model"], key)
        assert len(row["per_network_target_accuracy"]) == 4
    for name in EDITORS:
        assert (out / "tb" / name).is_dir()
    assert (out / "adapt.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "| ours |" in md and "| unadapted |" in md
    assert "by `epoch`" in md and "| unadapted (source) | " in md and "| unadapted (target) | " in md
    # the rebuilt classifiers reproduce the accuracy the zoo recorded for them (all 359 digit test images)
    recorded = zoo.meta["test_accuracy"][zoo.meta["split"] == 2].mean().item()
    assert payload["reference"]["unadapted_source_accuracy"] == pytest.approx(recorded, abs=1e-6)
    # rot90 takes the source networks far from their source accuracy: the shift is real
    assert payload["reference"]["unadapted_target_accuracy"] < recorded - 0.3


def test_adapt_reads_a_make_data_zoo(tmp_path):
    """``python -m tasks make-data zoo`` folders record the architecture and image dataset in their recipe."""
    from tasks.make_data import build_classifier_zoo

    folder = build_classifier_zoo(tmp_path / "zoo", n_models=10, epochs=(1,), dataset="digits", channels=(2, 2),
                                  train_size=128, train_eval=64, shard_size=10, progress=False)
    out = tmp_path / "out"
    assert main(["adapt", "--data", str(folder), "--out", str(out), "--models", "flat", "--shift", "hflip",
                 "--finetune-steps", "0", "--no-plot", *FAST]) == 0
    payload = json.loads((out / "results.json").read_text())
    ds = WeightDataset.load(folder)
    recorded = ds.meta["test_accuracy"][ds.meta["split"] == 2].mean().item()
    assert payload["reference"]["unadapted_source_accuracy"] == pytest.approx(recorded, abs=1e-6)
    assert [r["model"] for r in payload["rows"]] == ["flat", "unadapted"]


@pytest.mark.parametrize("name", EDITORS)
def test_adapters_are_equivariant_and_start_at_the_input(zoo, name):
    """Permuting the input classifier's hidden neurons permutes the adapted classifier the same way, so its
    target-domain predictions do not change; only the flat peer breaks this."""
    splits = load_splits(zoo, [])
    network, _ = source_classifier(splits)
    ws = splits.train
    torch.manual_seed(0)
    model = ResidualEditor(build_editor(name, splits.spec, TINY), splits, 1.0).eval()
    x = torch.rot90(load_digits("test")[0][:32, None], 1, dims=(-2, -1))
    x = x.expand(ws.batch_size, *x.shape)
    with torch.no_grad():
        unadapted = splits.normalizer.inverse(ws)
        assert all(torch.equal(a, b) for a, b in zip(model(ws).tensors(), unadapted.tensors()))
        for p in model.parameters():  # now give it a non-trivial output
            p.add_(0.1 * torch.randn_like(p))
        perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(1), batch_size=ws.batch_size)
        adapted = model(ws)
        a, b = model(ws.permute_hidden(perms)), adapted.permute_hidden(perms)
        diff = max((u - v).abs().max().item() for u, v in zip(a.tensors(), b.tensors()))
        change = max((u - v).abs().max().item() for u, v in zip(adapted.tensors(), unadapted.tensors()))
        logits = network.forward(classifier_params(adapted), x)
        permuted_logits = network.forward(classifier_params(a), x)
    assert change > 1e-2  # the adapter does change the weights
    if name == "flat":
        assert diff > 1e-3
    else:
        scale = max(t.abs().max().item() for t in b.tensors())
        assert diff < 1e-5 * max(1.0, scale)
        assert (logits - permuted_logits).abs().max().item() < 1e-4 * max(1.0, logits.abs().max().item())


def test_adaptation_helps_on_an_easy_shift(zoo, tmp_path):
    """Trained briefly on rotate:30, the adapted training networks beat the unadapted ones on rotated test
    images by a wide margin (it would not if the loss saw unrotated images or the wrong weights)."""
    n = len(zoo)
    copies = WeightDataset.concat([zoo, zoo, zoo])  # score the training networks themselves
    copies.meta["split"] = split_column(n, n, n)
    rows = run_adapt(copies, tmp_path, ["ours"], ModelConfig(8, 2, 32),
                     TrainConfig(epochs=30, batch_size=8, lr=3e-3, progress=False), shift="rotate:30",
                     image_batch=64, finetune_steps=0, plot=False)
    adapted, unadapted = rows[0]["test_target_accuracy"], rows[1]["test_target_accuracy"]
    assert adapted > unadapted + 0.1, (adapted, unadapted)
    assert rows[0]["test_improved_fraction"] >= 0.75


def test_matched_logits_ignore_the_scale_of_a_network():
    torch.manual_seed(0)
    logits, reference = torch.randn(3, 5, 10), 4 * torch.randn(3, 5, 10)
    scaled = logits * torch.tensor([0.01, 1.0, 50.0]).view(3, 1, 1)
    assert torch.allclose(matched_logits(scaled, reference), matched_logits(logits, reference), atol=1e-5)
    centred = reference - reference.mean(-1, keepdim=True)
    assert torch.allclose(matched_logits(reference, reference), centred, atol=1e-5)


def test_shifts():
    x = torch.rand(4, 8, 8)
    assert torch.equal(parse_shift("rot90")(x, 0), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.allclose(parse_shift("rotate:90")(x, 0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6)
    assert torch.allclose(parse_shift("rotate:0")(x, 0), x)
    assert torch.equal(parse_shift("invert")(x, 0), 1 - x)
    noisy = parse_shift("noise:0.3")
    assert torch.equal(noisy(x, 1), noisy(x, 1)) and not torch.equal(noisy(x, 1), noisy(x, 2))
    assert noisy(x, 1).min() >= 0 and noisy(x, 1).max() <= 1
    for bad in ("rot45", "rotate:", "noise:0", "blur"):
        with pytest.raises(StandaloneError, match="shift"):
            parse_shift(bad)


# ----------------------------------------------------------------------------- errors
def test_unknown_shift_is_a_clear_error(zoo_dir, tmp_path, capsys):
    assert main(["adapt", "--data", str(zoo_dir), "--out", str(tmp_path), "--shift", "rot45", *FAST]) == 2
    err = capsys.readouterr().err
    assert "rot45" in err and "rot90" in err


def test_inrs_are_not_a_classifier_zoo(tmp_path_factory, tmp_path, capsys):
    digits = digits_folder(tmp_path_factory, n_test=4, steps=2)
    assert main(["adapt", "--data", str(digits), "--out", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "classifier zoo" in err and "digits_inrs" in err


def test_a_zoo_without_a_record_of_its_classifier_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "zoo"
    synthetic_zoo(6, 2, 2).save_shard(shard_path(folder, 0))  # CNN weights, but nothing says how to run them
    assert main(["adapt", "--data", str(folder), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "classifier zoo" in capsys.readouterr().err


def test_a_zoo_whose_record_disagrees_with_its_weights_is_a_clear_error(zoo, tmp_path):
    ds = WeightDataset(zoo.spec, zoo.weights, zoo.biases, zoo.meta, dict(zoo.info, network="cnn[1x8x8,c4-4,tanh]"))
    with pytest.raises(StandaloneError, match="tanh"):
        run_adapt(ds, tmp_path, ["flat"], TINY, TrainConfig(epochs=1, progress=False))


def test_a_missing_group_column_is_a_clear_error(zoo_dir, tmp_path, capsys):
    assert main(["adapt", "--data", str(zoo_dir), "--out", str(tmp_path), "--group-by", "width", *FAST]) == 2
    err = capsys.readouterr().err
    assert "width" in err and "epoch" in err


def test_invariant_models_cannot_adapt(zoo_dir, tmp_path, capsys):
    assert main(["adapt", "--data", str(zoo_dir), "--out", str(tmp_path), "--models", "ours,statnn", *FAST]) == 2
    assert "cannot adapt" in capsys.readouterr().err
