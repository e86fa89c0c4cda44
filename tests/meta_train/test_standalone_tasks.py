"""The standalone weight-space tasks end to end on tiny datasets built here (seconds on CPU), their
errors on bad input, and that a learnable signal in the weights is actually learned."""

import json
import math

import pytest
import torch
from torch import nn

from meta_train.standalone.__main__ import main
from meta_train.standalone.classify import Classification
from meta_train.standalone.generalization import Generalization, kendall_tau, pairwise_rank_loss
from meta_train.standalone.regress import Regression
from meta_train.standalone.harness import (ModelConfig, StandaloneError, TrainConfig, build_model, load_splits,
                                           probing, run_supervised)
from meta_train.standalone.smalldata import digits_inrs, sine_inrs, split_column
from metaopt import WeightSpace, random_hidden_perms
from tasks.weight_data import WeightDataset, shard_path

from _standalone_data import FAST, classifier_zoo, digits_folder, synthetic_zoo

ALL = "ours,ours_np,gmn,nfn,flat,statnn,deepsets"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return digits_folder(tmp_path_factory, n_test=6, steps=20)


@pytest.fixture(scope="module")
def sine_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sine")
    sine_inrs(16, 6, 6, hidden=(8,), points=32, steps=20).save_shard(shard_path(folder, 0))
    return folder


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    synthetic_zoo(16, 6, 6).save_shard(shard_path(folder, 0))
    return folder


def _results(out):
    payload = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    return payload, md


@pytest.mark.parametrize("task,fixture,metric", [("classify", "digits_dir", "test_accuracy"),
                                                 ("regress", "sine_dir", "test_mse"),
                                                 ("generalization", "zoo_dir", "test_kendall_tau")])
def test_task_end_to_end(task, fixture, metric, request, tmp_path):
    data = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    assert main([task, "--data", str(data), "--out", str(out), "--models", ALL, *FAST]) == 0
    payload, md = _results(out)
    assert [r["model"] for r in payload["rows"]] == ALL.split(",")
    for row in payload["rows"]:
        assert math.isfinite(row[metric]), row
        assert row["params"] > 0 and row["train_seconds"] > 0
        assert len(row["history"]) == 2
        assert f"| {row['model']} |" in md
        assert (out / "tb" / row["model"]).is_dir()
    assert payload["sizes"] == {"train": 16, "val": 6, "test": 6}
    assert payload["command"].startswith(f"python -m meta_train.standalone {task} ")
    assert payload["reference"]


def test_meanmax_pooling_and_sign_flips_from_the_command_line(digits_dir, zoo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["classify", "--data", str(digits_dir), "--out", str(out), "--models", "ours,ours_np,flat",
                 "--pooling", "meanmax", "--sign-flips", *FAST]) == 0
    payload, _ = _results(out)
    assert payload["model_config"]["pooling"] == "meanmax" and payload["train_config"]["sign_flips"] is True
    assert all(math.isfinite(r["test_accuracy"]) for r in payload["rows"])
    mean_rows = run_supervised(Classification(), str(digits_dir), tmp_path / "mean", ["ours"],
                               ModelConfig(hidden_channels=4, num_layers=2, head_hidden=16),
                               TrainConfig(epochs=1, progress=False))
    assert payload["rows"][0]["params"] > mean_rows[0]["params"]  # the max half widens the head's input
    assert main(["regress", "--data", str(zoo_dir), "--out", str(tmp_path / "z"), "--target", "test_accuracy",
                 "--sign-flips", *FAST]) == 2
    assert "not a SIREN dataset" in capsys.readouterr().err


def test_the_sign_symmetric_gmn_runs_on_sirens_and_refuses_other_networks(digits_dir, sine_dir, zoo_dir, tmp_path,
                                                                          capsys):
    for task, data, metric in (("classify", digits_dir, "test_accuracy"), ("regress", sine_dir, "test_mse")):
        out = tmp_path / task
        assert main([task, "--data", str(data), "--out", str(out), "--models", "gmn_sign,gmn", *FAST]) == 0
        payload, md = _results(out)
        assert [r["model"] for r in payload["rows"]] == ["gmn_sign", "gmn"] and "| gmn_sign |" in md
        assert all(math.isfinite(r[metric]) for r in payload["rows"])
    capsys.readouterr()
    assert main(["generalization", "--data", str(zoo_dir), "--out", str(tmp_path / "z"), "--models", "gmn_sign",
                 *FAST]) == 2
    assert "not a SIREN dataset" in capsys.readouterr().err


def test_fourier_features_from_the_command_line_reach_every_model(sine_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["regress", "--data", str(sine_dir), "--out", str(out), "--models", ALL, "--fourier-features", "3",
                 "--fourier-scale", "0.5", *FAST]) == 0
    payload, _ = _results(out)
    assert payload["model_config"]["fourier_features"] == 3 and payload["model_config"]["fourier_scale"] == 0.5
    assert all(math.isfinite(r["test_mse"]) for r in payload["rows"])
    plain = {r["model"]: r["params"] for r in run_supervised(
        Regression(), str(sine_dir), tmp_path / "plain", ALL.split(","), ModelConfig(hidden_channels=4, num_layers=2,
        head_hidden=16), TrainConfig(epochs=1, progress=False))}
    for row in payload["rows"]:  # each model's first layer reads 1 + 2 * 3 channels instead of 1
        assert row["params"] > plain[row["model"]], row["model"]


def test_image_warps_from_the_command_line(digits_dir, sine_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["classify", "--data", str(digits_dir), "--out", str(out), "--models", "ours", "--image-warps",
                 "--canonical-signs", *FAST]) == 0
    payload, _ = _results(out)
    assert payload["train_config"]["image_warps"] is True and math.isfinite(payload["rows"][0]["test_accuracy"])
    assert main(["classify", "--data", str(sine_dir), "--out", str(tmp_path / "sine"), "--target", "frequency",
                 "--image-warps", *FAST]) == 2
    assert "redraw 2-D images" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_zoo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained_zoo")
    torch.set_num_threads(1)
    classifier_zoo(8, 4, 4, steps=30).save_shard(shard_path(folder, 0))
    return folder


@pytest.mark.parametrize("task,fixture,metric", [("classify", "digits_dir", "test_accuracy"),
                                                 ("regress", "sine_dir", "test_mse"),
                                                 ("generalization", "trained_zoo_dir", "test_kendall_tau")])
def test_probe_model_runs_every_architecture_a_dataset_records(task, fixture, metric, request, tmp_path):
    out = tmp_path / "out"
    assert main([task, "--data", str(request.getfixturevalue(fixture)), "--out", str(out), "--models", "probe",
                 "--num-probes", "5", *FAST]) == 0
    payload, md = _results(out)
    row = payload["rows"][0]
    assert row["model"] == "probe" and math.isfinite(row[metric]) and "| probe |" in md
    assert payload["model_config"]["num_probes"] == 5


def test_the_harness_probe_model_runs_the_raw_networks_behind_normalized_weights(trained_zoo_dir):
    splits = load_splits(trained_zoo_dir, ["test_accuracy"])
    assert max(abs(m) for m in splits.normalizer.means) > 1e-3  # the splits hold normalized weights
    model = build_model("probe", splits.spec, 1, ModelConfig(num_probes=4), probe=probing(splits))
    raw_model = model[1]  # ProbeNet itself, on raw weights
    raw = splits.normalizer.inverse(splits.test)
    with torch.no_grad():
        torch.testing.assert_close(model(splits.test), raw_model(raw))
        assert not torch.allclose(raw_model(splits.test), raw_model(raw), atol=1e-3)  # so undoing it matters
        g = torch.Generator().manual_seed(0)
        for _ in range(3):  # the normalizer's per-tensor scalars keep the whole model invariant
            perms = random_hidden_perms(splits.spec, g, batch_size=splits.test.batch_size)
            torch.testing.assert_close(model(splits.test.permute_hidden(perms)), model(splits.test))


def test_probe_model_errors_name_the_problem(zoo_dir, sine_dir, digits_dir, tmp_path, capsys):
    assert main(["generalization", "--data", str(zoo_dir), "--out", str(tmp_path / "a"), "--models", "probe",
                 *FAST]) == 2
    assert "names no architecture" in capsys.readouterr().err  # the synthetic zoo records none
    assert main(["regress", "--data", str(sine_dir), "--out", str(tmp_path / "b"), "--models", "probe",
                 "--fourier-features", "2", *FAST]) == 2
    assert "cannot read Fourier features" in capsys.readouterr().err
    assert main(["embed", "--data", str(digits_dir), "--out", str(tmp_path / "c"), "--models", "probe", *FAST]) == 2
    assert "contrasting views cannot train it" in capsys.readouterr().err


def test_canonical_signs_from_the_command_line(digits_dir, zoo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["classify", "--data", str(digits_dir), "--out", str(out), "--models", "ours", "--canonical-signs",
                 *FAST]) == 0
    payload, _ = _results(out)
    assert payload["train_config"]["canonical_signs"] is True and math.isfinite(payload["rows"][0]["test_accuracy"])
    assert main(["classify", "--data", str(digits_dir), "--out", str(tmp_path / "both"), "--canonical-signs",
                 "--sign-flips", *FAST]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["regress", "--data", str(zoo_dir), "--out", str(tmp_path / "z"), "--target", "test_accuracy",
                 "--canonical-signs", *FAST]) == 2
    assert "not a SIREN dataset" in capsys.readouterr().err


def test_results_tables_are_rewritten_whole(digits_dir, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "results.md").write_text("stale\n")
    assert main(["classify", "--data", str(digits_dir), "--out", str(out), "--models", "statnn", *FAST]) == 0
    payload, md = _results(out)
    assert "stale" not in md and [r["model"] for r in payload["rows"]] == ["statnn"]
    assert not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------- errors
def test_missing_metadata_column_is_a_clear_error(sine_dir, tmp_path, capsys):
    assert main(["classify", "--data", str(sine_dir), "--out", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "label" in err and "frequency" in err  # what is missing, and what the dataset has


def test_unknown_model_is_a_clear_error(digits_dir, tmp_path, capsys):
    assert main(["classify", "--data", str(digits_dir), "--out", str(tmp_path), "--models", "ours,mlp", *FAST]) == 2
    assert "mlp" in capsys.readouterr().err


def test_unknown_task_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--data", "x", "--out", "y"])
    assert "segment" in capsys.readouterr().err


def test_mixed_architectures_are_a_clear_error(digits_dir, tmp_path, capsys):
    folder = tmp_path / "mixed"
    WeightDataset.load(digits_dir).save_shard(shard_path(folder, 0))
    digits_inrs(4, 2, 2, hidden=(6, 6), steps=2).save_shard(shard_path(folder, 1))
    assert main(["classify", "--data", str(folder), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "architecture" in capsys.readouterr().err


def test_empty_split_is_a_clear_error(tmp_path):
    ds = synthetic_zoo(8, 0, 4)
    with pytest.raises(StandaloneError, match="val"):
        run_supervised(Generalization(), ds, tmp_path, ["statnn"], train_cfg=TrainConfig(epochs=1, progress=False))


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["regress", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "no shard" in capsys.readouterr().err


def test_kendall_tau():
    x = torch.arange(10.0)
    assert kendall_tau(x, x) == pytest.approx(1.0)
    assert kendall_tau(x, -x) == pytest.approx(-1.0)


def test_pairwise_rank_loss_scores_the_order_only():
    y = torch.tensor([0.1, 0.5, 0.3, 0.9])
    right = pairwise_rank_loss(10 * y, y)
    assert right < pairwise_rank_loss(-10 * y, y) and right < 0.1  # the right order, by a margin: near 0
    assert torch.allclose(pairwise_rank_loss(y.exp(), y), pairwise_rank_loss(y.exp(), y * 5 - 1))  # any monotone y
    ties = torch.ones(4)
    assert pairwise_rank_loss(y, ties) == 0.0  # no pair to order
    s = torch.zeros(4, requires_grad=True)
    pairwise_rank_loss(s, y).backward()
    assert (s.grad.argsort() == torch.tensor([3, 1, 2, 0])).all()  # the best network is pushed up most


def test_generalization_with_the_rank_loss_from_the_command_line(zoo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generalization", "--data", str(zoo_dir), "--out", str(out), "--models", "statnn", "--loss",
                 "rank", *FAST]) == 0
    payload, _ = _results(out)
    assert math.isfinite(payload["rows"][0]["test_kendall_tau"]) and "test_mse" not in payload["rows"][0]
    with pytest.raises(SystemExit):
        main(["generalization", "--data", str(zoo_dir), "--out", str(out), "--loss", "hinge", *FAST])
    assert "hinge" in capsys.readouterr().err


# ----------------------------------------------------------------------------- learning
def _scaled_mlps(n_train, n_val, n_test, seed=0):
    """MLPs 3-8-8-2 whose first layer is scaled by 0.4 (class 0) or 2.5 (class 1) after a random
    global rescale of the whole network: the class is in the *relative* layer scales, readable
    only from the weights."""
    torch.manual_seed(seed)
    n = n_train + n_val + n_test
    labels = torch.randint(0, 2, (n,))
    nets = []
    for y in labels:
        net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        with torch.no_grad():
            net[0].weight.mul_(2.5 if y else 0.4)
            g = float(torch.rand(()) + 0.5)
            for p in net.parameters():
                p.mul_(g)
        nets.append(net)
    ws = WeightSpace.from_modules(nets)
    return WeightDataset(ws.spec, [w[:, 0] for w in ws.weights], [b[:, 0] for b in ws.biases],
                         {"label": labels, "split": split_column(n_train, n_val, n_test)})


@pytest.mark.parametrize("model", ["ours", "gmn"])
def test_a_learnable_label_is_learned(tmp_path, model):
    ds = _scaled_mlps(160, 40, 100)
    torch.set_num_threads(1)
    rows = run_supervised(Classification(), ds, tmp_path, [model], ModelConfig(hidden_channels=8, num_layers=2,
                          head_hidden=32), TrainConfig(epochs=15, batch_size=32, lr=3e-3, progress=False))
    assert rows[0]["test_accuracy"] > 0.9  # chance is ~0.5


def test_compiled_models_train_like_eager_ones(tmp_path):
    """--compile compiles in place (through a backend that only records its graphs and runs them
    eagerly, to keep the test fast): the graphs are used, the losses are the same, and the kept
    best epoch loads into the model under its own parameter names."""
    from torch._dynamo import register_backend

    graphs = []

    @register_backend(name="metaopt_test_recording")
    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ds = _scaled_mlps(48, 16, 16)
    torch.set_num_threads(1)
    cfg = ModelConfig(hidden_channels=4, num_layers=1, head_hidden=8)
    runs = [run_supervised(Classification(), ds, tmp_path / str(c), ["gmn"], cfg,
                           TrainConfig(epochs=2, batch_size=16, progress=False, compile=c))[0]
            for c in (False, "metaopt_test_recording")]
    assert graphs
    eager, compiled = ([h["train_loss"] for h in r["history"]] for r in runs)
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert runs[1]["test_accuracy"] == pytest.approx(runs[0]["test_accuracy"])
    config = json.loads((tmp_path / "metaopt_test_recording" / "results.json").read_text())["train_config"]
    assert config["compile"] == "metaopt_test_recording"


def test_curves_put_runs_made_apart_in_one_picture(digits_dir, sine_dir, tmp_path, capsys):
    for name, models in (("a", "ours,flat"), ("b", "gmn")):
        assert main(["classify", "--data", str(digits_dir), "--out", str(tmp_path / name), "--models", models,
                     *FAST]) == 0
    picture = tmp_path / "plots" / "curves.png"
    assert main(["curves", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(picture),
                 "--labels", "first,second"]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["regress", "--data", str(sine_dir), "--out", str(tmp_path / "r"), "--models", "flat", *FAST]) == 0
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"rows": [')
    capsys.readouterr()
    for runs, extra, message in (([tmp_path / "a", tmp_path / "r"], [], "different metrics"),
                                 ([tmp_path / "a"], ["--labels", "x,y"], "2 labels for 1 runs"),
                                 ([tmp_path / "missing"], [], "does not exist"),
                                 ([tmp_path / "broken"], [], "not a standalone results file")):
        assert main(["curves", *map(str, runs), "--out", str(tmp_path / "x.png"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_learnable_ranking_is_learned(tmp_path):
    ds = synthetic_zoo(200, 40, 80, seed=1)
    torch.set_num_threads(1)
    rows = run_supervised(Generalization(), ds, tmp_path, ["ours"], ModelConfig(hidden_channels=8, num_layers=2,
                          head_hidden=32), TrainConfig(epochs=15, batch_size=32, lr=3e-3, progress=False))
    assert rows[0]["test_kendall_tau"] > 0.6  # an untrained model ranks at ~0


def test_training_keeps_the_best_finite_validation_epoch():
    from meta_train.standalone.harness import build_model, train_model
    ds = synthetic_zoo(8, 2, 2)
    ws = ds.weight_space()
    torch.manual_seed(0)
    model = build_model("statnn", ds.spec, 1, ModelConfig(head_hidden=8))
    scores = iter([float("nan"), 0.1, 0.3, 0.2])
    states = []

    def val_score(m):
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scores)

    summary = train_model(model, ws, lambda m, b, idx: m(b).square().mean(), val_score,
                          TrainConfig(epochs=4, batch_size=4, progress=False))
    assert summary["best_epoch"] == 2 and summary["best_val_score"] == 0.3
    assert all(torch.equal(v, states[2][k]) for k, v in model.state_dict().items())  # epoch 2's weights restored
