import os

import pytest
import torch
from torch.utils._pytree import tree_map

import tasks
from tasks import ClassifierFamily, Population, member
from tasks.data import FASHION_MNIST_DIR

needs_fashion = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST idx files not in {FASHION_MNIST_DIR} (apt-get install -y dataset-fashion-mnist)",
)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_adam_trains_digit_classifiers(arch):
    family = ClassifierFamily("digits", archs=(arch,), widths=(16,), depths=(2,), activations=("relu",),
                              batch_size=32, train_size=512, test_size=200)
    task = family.sample(0)
    before = task.evaluate(task.init_params(0))
    losses = tasks.train(task, lambda ps: torch.optim.Adam(ps, lr=1e-2), steps=80, seed=0)
    assert len(losses) == 80
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert before["test_accuracy"] < 0.3


def test_trained_classifier_is_accurate():
    family = ClassifierFamily("digits", archs=("mlp",), widths=(32,), depths=(1,), activations=("tanh",),
                              batch_size=32, train_size=1000, test_size=359)
    task = family.sample(4)
    module = task.module(task.init_params(0))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = task.loss(dict(module.named_parameters()), task.sample_batch(g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = task.evaluate({k: v.detach() for k, v in module.named_parameters()})
    assert set(metrics) == {"test_loss", "test_accuracy"}
    assert metrics["test_accuracy"] > 0.85 and metrics["test_loss"] < 0.5


def test_stacked_adam_is_per_member_adam():
    family = ClassifierFamily("digits", archs=("cnn",), widths=(4,), depths=(1,), activations=("silu",),
                              batch_size=16, train_size=256, test_size=50)
    pop = family.population(3, 2)
    seeds = [0, 1]
    stacked, history = tasks.train_population(pop, lambda ps: torch.optim.Adam(ps, lr=1e-2), 4, seeds,
                                              generator_seed=5)
    assert history.shape == (4, 2)
    # replay member 1 alone on the same batches
    g = torch.Generator().manual_seed(5)
    batches = [tree_map(lambda t: t[1], pop.sample_batch(g)) for _ in range(4)]
    module = pop.tasks[1].module(pop.tasks[1].init_params(seeds[1]))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for batch in batches:
        loss = pop.tasks[1].loss(dict(module.named_parameters()), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in module.named_parameters():
        assert torch.allclose(p, member(stacked, 1)[name], atol=1e-5), name


def test_members_differ_in_data_not_architecture():
    family = ClassifierFamily("digits", batch_size=8, train_size=300, test_size=20)
    pop = family.population(9, 3)
    assert len({t.network.name for t in pop.tasks}) == 1
    subsets = [set(t.subset.tolist()) for t in pop.tasks]
    assert subsets[0] != subsets[1]
    assert len(subsets[0]) == 300
    names = {family.sample(s).network.name for s in range(12)}
    assert len(names) > 3  # the family varies the architecture


@needs_fashion
@pytest.mark.parametrize("dataset,size", [("fashion_mnist", 28), ("fashion_mnist_8x8", 8)])
def test_fashion_mnist_populations(dataset, size):
    family = ClassifierFamily(dataset, archs=("cnn",), widths=(4,), depths=(2,), batch_size=8, train_size=256,
                              test_size=64, limit=512)
    pop = family.population(0, 3)
    params = pop.init_params([0, 1, 2])
    batch = pop.sample_batch(torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (3, 8, 1, size, size) and batch.targets.shape == (3, 8)
    assert pop.loss(params, batch).shape == (3,)
    metrics = pop.evaluate(params)
    assert metrics["test_accuracy"].shape == (3,) and ((metrics["test_loss"] > 2.0) & (metrics["test_loss"] < 2.6)).all()


def test_bad_family_arguments():
    with pytest.raises(ValueError, match="unknown classification dataset"):
        ClassifierFamily("mnist")
    with pytest.raises(ValueError, match="unknown architecture"):
        ClassifierFamily("digits", archs=("transformer",))
    with pytest.raises(ValueError, match="exceeds"):
        ClassifierFamily("digits", train_size=5000).sample(0)
    with pytest.raises(ValueError, match="below 1px"):
        tasks.cnn(8, (4, 4, 4, 4))
    with pytest.raises(ValueError, match="unsupported layer"):
        tasks.Network([torch.nn.Linear(2, 2), torch.nn.Dropout()], "bad")
    # a single-task batch where the population expects [P, ...]
    pop = Population([ClassifierFamily("digits", train_size=100, test_size=10).sample(0)])
    task = pop.tasks[0]
    with pytest.raises(ValueError, match="inputs must be"):
        pop.loss(pop.init_params([0]), task.sample_batch(torch.Generator()))
