"""SimCLR embedding and dilation editing end to end on tiny SIREN datasets, plus the pieces they
rest on: the NT-Xent loss, the differentiable renderer, equivariance of every editor."""

import json
import math

import pytest
import torch

from meta_train.standalone.__main__ import main
from meta_train.standalone.edit import EDITORS, build_editor, dilate, render
from meta_train.standalone.embed import knn_accuracy, nt_xent, symmetry_top1
from meta_train.standalone.harness import ModelConfig
from metaopt import random_hidden_perms
from tasks.inr import grid
from tasks.weight_data import WeightDataset, shard_path

from _standalone_data import FAST, digits_folder, synthetic_zoo



@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return digits_folder(tmp_path_factory, n_test=8, steps=30)


def test_embed_end_to_end(digits_dir, tmp_path):
    out = tmp_path / "embed"
    assert main(["embed", "--data", str(digits_dir), "--out", str(out), "--models", "ours,nfn,flat,statnn",
                 "--dim", "8", *FAST]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in payload["rows"]] == ["ours", "nfn", "flat", "statnn"]
    for row in payload["rows"]:
        for key in ("test_linear_probe_accuracy", "test_knn_accuracy", "test_symmetry_cosine", "test_symmetry_top1",
                    "val_nt_xent"):
            assert math.isfinite(row[key]), (row["model"], key)
        assert 0 <= row["test_linear_probe_accuracy"] <= 1
    assert (out / "tsne.png").stat().st_size > 1000
    assert "raw_weights_linear_probe_accuracy" in payload["reference"]


def test_edit_end_to_end(digits_dir, tmp_path):
    out = tmp_path / "edit"
    assert main(["edit", "--data", str(digits_dir), "--out", str(out), "--models", "ours,ours_np,nfn,flat",
                 *FAST]) == 0  # image size comes from the dataset's info
    payload = json.loads((out / "results.json").read_text())
    assert payload["image_size"] == 8
    for row in payload["rows"]:
        assert math.isfinite(row["test_mse"]) and row["test_mse"] >= 0
    assert (out / "edits.png").stat().st_size > 1000


def test_edit_reads_image_size_and_w0_from_a_make_data_recipe(digits_dir, tmp_path):
    """Datasets of ``python -m tasks make-data`` record {"recipe": {"dataset": ..., "w0": ...}}."""
    ds = WeightDataset.load(digits_dir)
    ds.info = {"recipe": {"builder": "image_inrs", "dataset": "digits", "w0": 30.0}}
    folder = tmp_path / "recipe"
    ds.save_shard(shard_path(folder, 0))
    assert main(["edit", "--data", str(folder), "--out", str(tmp_path / "o"), "--models", "flat", "--no-plot",
                 *FAST]) == 0
    payload = json.loads((tmp_path / "o" / "results.json").read_text())
    assert payload["image_size"] == 8 and payload["w0"] == 30.0
    ds.info = {}
    ds.save_shard(shard_path(tmp_path / "bare", 0))
    assert main(["edit", "--data", str(tmp_path / "bare"), "--out", str(tmp_path / "o2"), *FAST]) == 2


def test_edit_refuses_invariant_models_and_non_images(digits_dir, tmp_path, capsys):
    assert main(["edit", "--data", str(digits_dir), "--out", str(tmp_path / "a"), "--models", "statnn", *FAST]) == 2
    assert "cannot edit" in capsys.readouterr().err
    from meta_train.standalone.smalldata import sine_inrs
    sine = tmp_path / "sine"
    sine_inrs(4, 2, 2, hidden=(4,), points=8, steps=2).save_shard(shard_path(sine, 0))
    assert main(["edit", "--data", str(sine), "--out", str(tmp_path / "b"), *FAST]) == 2
    assert "2-D image SIRENs" in capsys.readouterr().err


def test_embed_refuses_convolutional_networks(tmp_path, capsys):
    folder = tmp_path / "zoo"
    ds = synthetic_zoo(6, 2, 2)
    ds.meta["label"] = (ds.meta["test_accuracy"] > 0.5).long()
    ds.save_shard(shard_path(folder, 0))
    assert main(["embed", "--data", str(folder), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "SIREN" in capsys.readouterr().err


def test_nt_xent_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(16, 8)
    matched = nt_xent(z, z + 0.01 * torch.randn_like(z))
    shuffled = nt_xent(z, z[torch.randperm(16)])
    assert matched < shuffled and matched < 0.1
    assert abs(nt_xent(torch.ones(4, 3), torch.ones(4, 3)).item() - math.log(7)) < 1e-4  # all alike: chance


def test_knn_accuracy():
    train = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    assert knn_accuracy(train, labels, torch.tensor([[1.0, 0.05], [0.0, 1.0]]), torch.tensor([0, 1]), k=1) == 1.0


def test_symmetry_top1_needs_both_invariance_and_distinct_embeddings():
    torch.manual_seed(0)
    z = torch.randn(10, 4)
    assert symmetry_top1(z, z + 1e-3 * torch.randn_like(z)) == 1.0
    collapsed = torch.ones(10, 4) + 1e-6 * torch.randn(10, 4)  # cosine ~1 everywhere, but nothing told apart
    assert symmetry_top1(collapsed, collapsed.flip(0)) < 0.5


def test_render_matches_the_module_and_dilate_is_a_max_filter(digits_dir):
    ds = WeightDataset.load(digits_dir)
    ws = ds.weight_space(slice(0, 3))
    from tasks.inr import siren
    template = siren(2, [8, 8], 1).module()
    coords = grid((8, 8))[1]
    modules = ws.to_modules(template)
    with torch.no_grad():
        expected = torch.stack([m(coords)[:, 0] + 0.5 for m in modules])
    assert torch.allclose(render(ws, coords, 30.0), expected, atol=1e-5)
    img = torch.zeros(1, 5, 5)
    img[0, 2, 2] = 1.0
    assert dilate(img)[0, 1:4, 1:4].eq(1).all() and dilate(img).sum() == 9


@pytest.mark.parametrize("name", EDITORS)
def test_editors_are_equivariant_and_start_at_zero(digits_dir, name):
    ws = WeightDataset.load(digits_dir).weight_space(slice(0, 4))
    torch.manual_seed(0)
    editor = build_editor(name, ws.spec, ModelConfig(hidden_channels=4, num_layers=2, head_hidden=16)).eval()
    with torch.no_grad():
        assert all(t.abs().max() == 0 for t in editor(ws).tensors())  # residual edits start at the identity
        for p in editor.parameters():  # now give it a non-trivial output
            p.add_(0.1 * torch.randn_like(p))
        perms = random_hidden_perms(ws.spec, torch.Generator().manual_seed(1), batch_size=4)
        a, b = editor(ws.permute_hidden(perms)), editor(ws).permute_hidden(perms)
        diff = max((x - y).abs().max().item() for x, y in zip(a.tensors(), b.tensors()))
    if name == "flat":
        assert diff > 1e-3  # the flat MLP is the peer that ignores the symmetry
    else:
        assert diff < 1e-5 * max(1.0, max(t.abs().max().item() for t in b.tensors()))
