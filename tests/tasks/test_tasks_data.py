import gzip
import os

import pytest
import torch

from tasks import data

FASHION = os.path.join(data.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(
    not os.path.isfile(FASHION),
    reason=f"Fashion-MNIST idx files not in {data.FASHION_MNIST_DIR} (apt-get install -y dataset-fashion-mnist)",
)


def test_digits_split_is_fixed_and_disjoint():
    x_train, y_train = data.load_digits("train")
    x_test, y_test = data.load_digits("test")
    assert x_train.shape == (1438, 8, 8) and x_test.shape == (359, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= x_train.min() and x_train.max() == 1.0
    assert set(y_test.tolist()) == set(range(10))
    # no test image is also a training image (digits has a few duplicates, so compare counts)
    train_rows = {tuple(r) for r in x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in x_test.flatten(1).tolist())
    assert overlap < 5
    assert torch.equal(data.load_digits("test")[0], x_test)


@needs_fashion
def test_fashion_mnist_slice():
    x, y = data.load_fashion_mnist("train", limit=512)
    assert x.shape == (512, 28, 28) and y.shape == (512,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert y.min() >= 0 and y.max() <= 9
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first training labels
    small, _ = data.load_fashion_mnist("test", limit=16, size=8)
    assert small.shape == (16, 8, 8)
    full, _ = data.load_fashion_mnist("test", limit=16)
    assert torch.allclose(small.mean((1, 2)), full.mean((1, 2)), atol=0.03)  # area averaging ~keeps the mean
    assert torch.allclose(data.resize(torch.full((1, 28, 28), 0.25), 8), torch.full((1, 8, 8), 0.25))


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist("train", path=str(tmp_path), limit=4)


def test_idx_parsing_and_bad_files(tmp_path):
    good = tmp_path / "images.gz"
    payload = bytes(range(2 * 3 * 4))
    with gzip.open(good, "wb") as f:
        f.write((2051).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big"))
        f.write(payload)
    arr = data.read_idx(str(good))
    assert arr.shape == (2, 3, 4) and arr[1, 2, 3] == 23
    assert data.read_idx(str(good), limit=1).shape == (1, 3, 4)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write((1234).to_bytes(4, "big"))
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        data.read_idx(str(bad))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write((2049).to_bytes(4, "big") + (10).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(str(short))


def test_bad_names():
    with pytest.raises(ValueError, match="unknown image dataset"):
        data.load_images("cifar10")
    with pytest.raises(ValueError, match="split"):
        data.load_digits("validation")


def test_sine_waves_are_seeded_and_in_range():
    a, b = data.sine_wave(3, 64), data.sine_wave(3, 64)
    assert a.shape == (64,) and torch.equal(a, b)
    assert not torch.equal(a, data.sine_wave(4, 64))
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.max() - a.min() > 0.3
