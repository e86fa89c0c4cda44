"""Dataset builders (tasks.make_data) and their command line, on tiny builds (digits ship with scikit-learn)."""

import json
import math
import os

import pytest
import torch
from filelock import FileLock
from safetensors import safe_open

from tasks import INRTask, Population, SirenFit, data, grid, psnr, siren
from tasks.__main__ import main
from tasks.make_data import (RECIPE_FILE, build_classifier_zoo, build_image_inrs, build_sine_inrs,
                             fit_sirens, image_splits, network_for, read_recipe, sine_signal)
from tasks.weight_data import SPLITS, WeightDataError, WeightDataset, existing_shards, shard_path

FASHION = os.path.join(data.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(
    not os.path.isfile(FASHION),
    reason=f"Fashion-MNIST idx files not in {data.FASHION_MNIST_DIR} (apt-get install -y dataset-fashion-mnist)",
)
TINY_INR = dict(dataset="digits", limit=2, views=2, steps=30, shard_size=5, progress=False)


def module_of(dataset: WeightDataset, j: int):
    """Row j of a dataset as a runnable nn.Module, the way a user rebuilds one."""
    return dataset.weight_space([j]).to_modules(network_for(dataset.info["recipe"]).module())[0]


@pytest.fixture(autouse=True)
def one_thread():
    """These builds are tiny: one thread is several times faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shard_contents(folder):
    """Every tensor and header entry of every shard.  (Not the raw bytes: safetensors writes the header's
    metadata keys in hash-map order, which changes from one save to the next.)"""
    contents = {}
    for path in existing_shards(folder):
        with safe_open(str(path), framework="pt") as f:
            contents[path.name] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    return contents


def same_data(a, b) -> bool:
    a, b = shard_contents(a), shard_contents(b)
    return a.keys() == b.keys() and all(
        a[n][0] == b[n][0] and a[n][1].keys() == b[n][1].keys()
        and all(torch.equal(a[n][1][k], b[n][1][k]) and a[n][1][k].dtype == b[n][1][k].dtype for k in a[n][1])
        for n in a)


# ---------------------------------------------------------------------------------------
# image INRs


def test_digits_splits_extend_load_digits():
    s = image_splits("digits")
    assert [int((s.split == c).sum()) for c in SPLITS.values()] == [1258, 180, 359]
    assert torch.equal(s.images[s.split == SPLITS["test"]], data.load_digits("test")[0])
    train_x = data.load_digits("train")[0]
    assert torch.equal(s.images[s.split == SPLITS["val"]], train_x[:180])
    assert torch.equal(s.images[s.split == SPLITS["train"]], train_x[180:])
    assert sorted(s.index.tolist()) == list(range(1797))  # every image once


def test_image_inrs_layout_and_metadata(tmp_path):
    out = build_image_inrs(tmp_path / "inr", **TINY_INR)
    d = WeightDataset.load(out)
    assert len(existing_shards(out)) == 3 and len(d) == 3 * 2 * 2  # splits x limit x views
    assert [tuple(w.shape) for w in d.weights] == [(12, 32, 2), (12, 32, 32), (12, 1, 32)]
    assert set(d.meta) == {"label", "split", "image_index", "view", "seed", "psnr", "steps"}
    assert d.meta["split"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert d.meta["view"].tolist() == [0, 1] * 6
    assert len(set(d.meta["seed"].tolist())) == 12  # views are independent fits
    assert not torch.equal(d.weights[1][0], d.weights[1][1])
    assert torch.equal(d.meta["image_index"][::2], d.meta["image_index"][1::2])
    source = image_splits("digits")
    labels = {int(i): int(y) for i, y in zip(source.index, source.labels)}
    assert d.meta["label"].tolist() == [labels[int(i)] for i in d.meta["image_index"]]
    assert (d.meta["steps"] == 30).all() and (d.meta["psnr"] > 10).all()
    recipe = read_recipe(out)
    assert recipe == d.info["recipe"] and recipe["builder"] == "image_inrs" and recipe["steps"] == 30
    assert json.loads((out / RECIPE_FILE).read_text())["built_with"]["device"] == "cpu"


def test_stored_weights_reproduce_the_image(tmp_path):
    d = WeightDataset.load(build_image_inrs(tmp_path / "inr", **TINY_INR))
    source = image_splits("digits")
    _, coords = grid((8, 8))
    for j in (0, 7, 11):
        image = source.images[source.index == d.meta["image_index"][j]][0]
        with torch.no_grad():
            fitted = module_of(d, j)(coords).reshape(8, 8) + 0.5
        assert psnr((fitted - image).square().mean()).item() == pytest.approx(d.meta["psnr"][j].item(), abs=1e-3)


def test_rebuild_is_identical_and_resume_fits_only_missing_shards(tmp_path):
    built = []
    a = build_image_inrs(tmp_path / "a", **TINY_INR, on_shard=lambda i, shard: built.append(i))
    assert built == [0, 1, 2]
    b = build_image_inrs(tmp_path / "b", **TINY_INR)
    assert same_data(a, b)  # deterministic

    shard_path(a, 2).unlink()  # a build killed before its last shard
    built.clear()
    build_image_inrs(a, **TINY_INR, on_shard=lambda i, shard: built.append(i))
    assert built == [2] and same_data(a, b)
    built.clear()
    build_image_inrs(a, **TINY_INR, on_shard=lambda i, shard: built.append(i))
    assert built == []  # a complete folder is a cache hit


def test_a_worker_skips_shards_other_processes_hold_and_an_unfinished_folder_does_not_load(tmp_path, capsys):
    built = []
    a = tmp_path / "a"
    a.mkdir()
    others = [FileLock(f"{shard_path(a, i)}.lock") for i in (0, 2)]  # shards 0 and 2 in progress elsewhere
    for lock in others:
        lock.acquire(blocking=False)
    build_image_inrs(a, **TINY_INR, worker=(1, 2), on_shard=lambda i, shard: built.append(i))
    assert built == [1]
    for lock in others:
        lock.release()
    assert json.loads((a / RECIPE_FILE).read_text())["shards"] == 3
    with pytest.raises(WeightDataError, match=r"unfinished: 2 shard\(s\) missing \(0, 2\)"):
        WeightDataset.load(a)
    assert len(WeightDataset.load(a, partial=True)) == 5  # shard 1 only
    # the command line of worker 0 finishes the folder and then prints its summary
    argv = ["make-data", "inr", "--dataset", "digits", "--limit", "2", "--views", "2", "--steps", "30",
            "--shard-size", "5", "--quiet", "--out", str(a)]
    assert main(argv + ["--worker", "0/2"]) == 0
    assert "networks in" in capsys.readouterr().out
    assert same_data(a, build_image_inrs(tmp_path / "b", **TINY_INR))  # = one process's build
    # a killed single build (last shard missing) is refused too, not loaded as a smaller dataset
    shard_path(a, 2).unlink()
    with pytest.raises(WeightDataError, match="unfinished"):
        WeightDataset.load(a)
    with pytest.raises(SystemExit):
        main(argv + ["--worker", "2/2"])
    with pytest.raises(ValueError, match="worker"):
        build_image_inrs(tmp_path / "c", **TINY_INR, worker=(2, 2))


def test_a_worker_done_with_its_share_builds_the_shards_nobody_started(tmp_path):
    built = []
    a = build_image_inrs(tmp_path / "a", **TINY_INR, worker=(1, 2), on_shard=lambda i, shard: built.append(i))
    assert built == [1, 2, 0]  # its own, then the others' from the last one down
    assert same_data(a, build_image_inrs(tmp_path / "b", **TINY_INR))
    assert not list(a.glob("*.lock"))  # lock files go once their shard is on disk


def test_an_interrupted_shard_leaves_only_its_lock_file_and_the_next_build_takes_it_over(tmp_path, monkeypatch):
    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(WeightDataset, "save_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_image_inrs(tmp_path / "a", **TINY_INR)
    assert [p.name for p in (tmp_path / "a").glob("shard-*")] == ["shard-00000.safetensors.lock"]
    monkeypatch.undo()
    built = []
    a = build_image_inrs(tmp_path / "a", **TINY_INR, on_shard=lambda i, shard: built.append(i))
    assert built == [0, 1, 2] and not list(a.glob("*.lock"))


def test_other_recipe_in_existing_folder_is_an_error(tmp_path):
    out = build_image_inrs(tmp_path / "inr", **{**TINY_INR, "limit": 1})
    with pytest.raises(WeightDataError, match=r"another recipe \(steps: folder has 30, this build asks 31\)"):
        build_image_inrs(out, **{**TINY_INR, "limit": 1, "steps": 31})
    with pytest.raises(WeightDataError, match="another recipe"):
        build_sine_inrs(out, n=2, steps=5, progress=False)
    (out / RECIPE_FILE).unlink()
    with pytest.raises(WeightDataError, match="no recipe.json"):
        build_image_inrs(out, **{**TINY_INR, "limit": 1})


def test_init_is_part_of_the_recipe_and_old_folders_are_sitzmann(tmp_path):
    new = build_image_inrs(tmp_path / "new", **{**TINY_INR, "limit": 1})
    assert read_recipe(new)["init"] == "dwsnets" and "dwsnets init" in network_for(read_recipe(new)).name
    first = WeightDataset.load(new).weights[0]  # 30 Adam steps of 5e-4 move a weight by at most 0.015
    assert first.shape[0] == 6 and first.abs().max() < math.sqrt(6 / 2) / 30 + 0.02  # Sitzmann's would reach 0.5
    old = build_image_inrs(tmp_path / "old", **{**TINY_INR, "limit": 1, "init": "sitzmann"})
    recipe_file = old / RECIPE_FILE
    stored = json.loads(recipe_file.read_text())
    del stored["recipe"]["init"]  # as written before init was an option
    recipe_file.write_text(json.dumps(stored))
    assert network_for(read_recipe(old)).name == siren(2, (32, 32), 1).name
    build_image_inrs(old, **{**TINY_INR, "limit": 1, "init": "sitzmann"})  # resumes: same recipe
    with pytest.raises(WeightDataError, match="init: folder has 'sitzmann', this build asks 'dwsnets'"):
        build_image_inrs(old, **{**TINY_INR, "limit": 1})
    with pytest.raises(ValueError, match="unknown SIREN init 'xavier'"):
        build_image_inrs(tmp_path / "bad", **{**TINY_INR, "init": "xavier"})
    assert not (tmp_path / "bad").exists()


def test_early_stop_keeps_the_weights_of_the_target_step(tmp_path):
    steps, target = 300, 18.0
    d = WeightDataset.load(build_image_inrs(tmp_path / "inr", **{**TINY_INR, "views": 1, "steps": steps,
                                                                   "target_psnr": target, "shard_size": 6}))
    used = d.meta["steps"]
    assert (used < steps).all() and len(set(used.tolist())) > 1
    assert (d.meta["psnr"] > target - 0.01).all()  # the fast fit's PSNR and the stored re-evaluation agree closely
    # Refit the same shard without early stop for member j's step count: the same weights (up to
    # float rounding: finished members leave the fit, so the others run in other batch positions).
    j = int(used.argmax())
    source = image_splits("digits", limit=2)
    plain = fit_sirens(network_for(d.info["recipe"]), source.images, d.meta["seed"].tolist(), int(used[j]),
                       5e-4, target_psnr=None, device="cpu")
    torch.testing.assert_close(plain.params["2.weight"][j], d.weights[1][j], rtol=1e-4, atol=1e-5)


def test_bad_image_options():
    with pytest.raises(ValueError, match="unknown image dataset 'cifar10'"):
        build_image_inrs("/nonexistent", dataset="cifar10")
    with pytest.raises(ValueError, match="views, steps and shard_size"):
        build_image_inrs("/nonexistent", dataset="digits", views=0)
    with pytest.raises(ValueError, match="limit"):
        build_image_inrs("/nonexistent", dataset="digits", limit=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        build_image_inrs("/nonexistent", dataset="digits", seed=-1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        build_image_inrs("/nonexistent", dataset="digits", lr=0)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_image_inrs("/nonexistent", dataset="fashion_mnist", data_dir="/nonexistent")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            build_image_inrs("/nonexistent", dataset="digits", device="cuda")


@needs_fashion
def test_fashion_mnist_splits_and_a_small_fit(tmp_path):
    s = image_splits("fashion_mnist", limit=2)
    assert s.images.shape == (6, 28, 28)
    assert s.index.tolist() == [0, 1, 55000, 55001, 60000, 60001]
    assert s.labels[:2].tolist() == [9, 0]  # the published first training labels
    assert torch.equal(s.images[4], data.load_fashion_mnist("test", limit=1)[0][0])
    assert image_splits("fashion_mnist_8x8", limit=2).images.shape == (6, 8, 8)
    d = WeightDataset.load(build_image_inrs(tmp_path / "f", dataset="fashion_mnist", limit=1, steps=20,
                                            progress=False))
    assert len(d) == 3 and d.meta["image_index"].tolist() == [0, 55000, 60000] and (d.meta["psnr"] > 8).all()


def test_population_to_device_carries_data_batches_and_the_fit():
    """The device plumbing that lets SirenFit run on a GPU, checked on the meta device (no GPU needed)."""
    images = data.load_digits("test")[0][:3]
    population = Population([INRTask(siren(2, (8,)), x, i) for i, x in enumerate(images)]).to("meta")
    on_device = population.device_data()
    assert all(t.is_meta for t in (*on_device.axes, on_device.coords, on_device.targets))
    assert not population.data.targets.is_meta  # the CPU copy stays, batches are drawn from it
    assert all(t.is_meta for t in population.sample_batch(None))
    fit = SirenFit(population, [0, 1, 2])
    assert fit.flat.is_meta and fit.flat.shape[0] == 3 and fit.targets.is_meta
    losses = fit.step()  # every tensor of the hand-written step lives on the fit's device
    assert losses.is_meta and losses.shape == (3,) and fit.grad.is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fit_matches_cpu(tmp_path):
    cpu = WeightDataset.load(build_image_inrs(tmp_path / "cpu", **TINY_INR, device="cpu"))
    gpu = WeightDataset.load(build_image_inrs(tmp_path / "gpu", **TINY_INR, device="cuda"))
    assert json.loads((tmp_path / "gpu" / RECIPE_FILE).read_text())["built_with"]["device"].startswith("cuda")
    assert gpu.weights[0].device.type == "cpu"
    assert torch.allclose(gpu.meta["psnr"], cpu.meta["psnr"], atol=0.5)


# ---------------------------------------------------------------------------------------
# sine INRs


def test_sine_inrs(tmp_path):
    out = build_sine_inrs(tmp_path / "sine", n=10, points=64, amplitude=(0.1, 0.5), steps=300, shard_size=4,
                          progress=False)
    d = WeightDataset.load(out)
    assert len(d) == 10 and len(existing_shards(out)) == 3
    assert [tuple(w.shape) for w in d.weights] == [(10, 32, 1), (10, 32, 32), (10, 1, 32)]
    assert [int((d.meta["split"] == c).sum()) for c in SPLITS.values()] == [8, 1, 1]
    a, b = d.meta["amplitude"], d.meta["frequency"]
    assert ((0.1 <= a) & (a <= 0.5)).all() and ((0.5 <= b) & (b <= 10)).all() and len(set(b.tolist())) == 10
    reached = d.meta["psnr"] > 39.99  # DWSNets' init fits some waves in 300 steps, not all
    assert 0 < reached.sum() < 10 and (reached == (d.meta["steps"] < 300)).all()  # and only those stopped early
    # the network itself computes a sin(b pi u) on the grid u in [-1, 1]
    u = torch.linspace(-1, 1, 64)[:, None]
    for j in (0, 9):
        with torch.no_grad():
            wave = module_of(d, j)(u)[:, 0]
        target = sine_signal(float(a[j]), float(b[j]), 64) - 0.5
        assert torch.allclose(target, a[j] * torch.sin(b[j] * math.pi * u[:, 0]), atol=1e-5)
        assert psnr((wave - target).square().mean()).item() == pytest.approx(d.meta["psnr"][j].item(), abs=1e-2)
    again = build_sine_inrs(tmp_path / "again", n=10, points=64, amplitude=(0.1, 0.5), steps=300, shard_size=4,
                            progress=False)
    assert same_data(again, out)
    with pytest.raises(ValueError, match="amplitude must be a range"):
        build_sine_inrs(tmp_path / "bad", amplitude=(0.5, 0.1))
    with pytest.raises(ValueError, match="split fractions"):
        build_sine_inrs(tmp_path / "bad", split_fractions=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------
# classifier zoo

TINY_ZOO = dict(n_models=5, epochs=(0, 2), dataset="digits", train_size=256, test_size=120, batch_size=16,
                lr=(1e-3, 1e-2), shard_size=3, split_fractions=(0.6, 0.2, 0.2), progress=False)


def test_zoo_layout_metadata_and_splits_by_model(tmp_path):
    out = build_classifier_zoo(tmp_path / "zoo", **TINY_ZOO)
    d = WeightDataset.load(out)
    assert len(d) == 10 and len(existing_shards(out)) == 2
    assert [tuple(w.shape) for w in d.weights] == [(10, 8, 1, 3, 3), (10, 8, 8, 3, 3), (10, 10, 8, 4)]
    assert d.meta["model"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert d.meta["epoch"].tolist() == [0, 2] * 5 and d.meta["step"].tolist() == [0, 32] * 5
    split = d.meta["split"].view(5, 2)
    assert torch.equal(split[:, 0], split[:, 1])  # both checkpoints of a model share its split
    assert sorted(split[:, 0].tolist()) == [0, 0, 0, 1, 2]
    for key in ("lr", "weight_decay", "init_scale", "train_fraction", "seed", "train_size"):
        col = d.meta[key].view(5, 2)
        assert torch.equal(col[:, 0], col[:, 1]) and len(set(col[:, 0].tolist())) == 5, key
    assert ((1e-3 <= d.meta["lr"]) & (d.meta["lr"] <= 1e-2)).all()
    acc = d.meta["test_accuracy"].view(5, 2)
    assert acc[:, 1].mean() > acc[:, 0].mean() + 0.05 and acc[:, 1].max() > 0.3  # training did something
    # epoch 0 stores the scaled init, so the recorded seed and init_scale are the ones used
    net = network_for(d.info["recipe"])
    init = net.init_params(int(d.meta["seed"][2]))
    assert torch.allclose(d.weights[0][2], init["0.weight"] * d.meta["init_scale"][2])


def test_zoo_accuracy_matches_the_stored_model_and_rebuild_is_identical(tmp_path):
    out = build_classifier_zoo(tmp_path / "zoo", **TINY_ZOO)
    d = WeightDataset.load(out)
    x, y = data.load_digits("test")
    x, y = x[:120, None], y[:120]
    for j in range(len(d)):
        with torch.no_grad():
            logits = module_of(d, j)(x)
        assert (logits.argmax(1) == y).float().mean().item() == pytest.approx(d.meta["test_accuracy"][j].item())
        assert torch.nn.functional.cross_entropy(logits, y).item() == pytest.approx(d.meta["test_loss"][j].item(),
                                                                                   rel=1e-4)
    assert same_data(build_classifier_zoo(tmp_path / "again", **TINY_ZOO), out)


def test_bad_zoo_options(tmp_path):
    with pytest.raises(ValueError, match="unknown zoo dataset"):
        build_classifier_zoo(tmp_path / "z", dataset="mnist")
    with pytest.raises(ValueError, match="epochs"):
        build_classifier_zoo(tmp_path / "z", dataset="digits", epochs=(-1,))
    with pytest.raises(ValueError, match="log-uniformly"):
        build_classifier_zoo(tmp_path / "z", dataset="digits", weight_decay=(0, 1e-3))
    with pytest.raises(ValueError, match="train_size=5000 but digits has only 1438"):
        build_classifier_zoo(tmp_path / "z", dataset="digits", train_size=5000)
    assert not (tmp_path / "z").exists()  # nothing written for a bad build


# ---------------------------------------------------------------------------------------
# command line


def test_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))  # --threads sets it; undo after
    out = tmp_path / "cli"
    args = ["make-data", "sine", "--out", str(out), "--n", "10", "--points", "32", "--steps", "200",
            "--shard-size", "5", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"10 networks in {out}" in printed and "train       8" in printed and "PSNR mean" in printed
    assert main(args[:-3] + ["--shard-size", "4", "--quiet"]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert main(["make-data", "zoo", "--out", str(tmp_path / "zoo"), "--dataset", "digits", "--models", "2",
                 "--epochs", "1", "--train-size", "64", "--test-size", "50", "--threads", "1", "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    assert "final-epoch test accuracy" in capsys.readouterr().out
    assert main(["make-data", "inr", "--out", str(tmp_path / "f"), "--data-dir", str(tmp_path), "--quiet"]) == 2
    assert "--data-dir" in capsys.readouterr().err and not (tmp_path / "f").exists()
    with pytest.raises(SystemExit):
        main(["make-data", "inr", "--out", str(out), "--views", "0"])
    assert "must be >= 1" in capsys.readouterr().err
