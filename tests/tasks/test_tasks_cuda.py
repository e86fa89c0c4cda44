"""Task populations on a GPU: the same batches, losses and metrics as on the CPU.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/tasks/test_tasks_cuda.py``.
"""

import pytest
import torch

import tasks

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("exact_fp32")]

FAMILIES = {
    "classify-mlp": (lambda: tasks.ClassifierFamily("digits", archs=("mlp",), widths=(8,), depths=(1,),
                                                    activations=("tanh",), batch_size=16, train_size=128,
                                                    test_size=50), "test_loss"),
    "classify-cnn": (lambda: tasks.ClassifierFamily("digits", archs=("cnn",), widths=(4,), depths=(1,),
                                                    activations=("relu",), batch_size=16, train_size=128,
                                                    test_size=50), "test_loss"),
    "inr": (lambda: tasks.INRFamily("digits", widths=(8,), depths=(1,), images=20), "mse"),
    "rl": (lambda: tasks.RLFamily(("CartPole-v1",), widths=(8,), depths=(1,), episodes=4, horizon=20,
                                  eval_episodes=2, eval_steps=30), "negative_return"),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_population_on_gpu_matches_cpu(name):
    make, metric = FAMILIES[name]
    cpu, gpu = make().population(3, 4), make().population(3, 4).to("cuda")
    params = cpu.init_params([0, 1, 2, 3])
    batch_cpu = cpu.sample_batch(torch.Generator().manual_seed(0))
    batch_gpu = gpu.sample_batch(torch.Generator().manual_seed(0))
    assert all(t.is_cuda for t in batch_gpu if isinstance(t, torch.Tensor))
    loss_cpu = cpu.loss(params, batch_cpu)
    loss_gpu = gpu.loss({k: v.cuda() for k, v in params.items()}, batch_gpu)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, atol=1e-4, rtol=1e-4)
    got = gpu.evaluate({k: v.cuda() for k, v in params.items()})[metric]
    torch.testing.assert_close(got.cpu(), cpu.evaluate(params)[metric], atol=1e-4, rtol=1e-4)


def test_small_suite_outer_steps_on_gpu(tmp_path):
    from meta_train.config import Config
    from meta_train.loop import MetaTrainer
    from meta_train.suites import build_problem

    config = Config(suite="small", outer_steps=2, num_groups=1, tasks_per_group=2, truncation_length=2,
                    min_horizon=4, max_horizon=8, eval_every=0, device="cuda", progress=False)
    trainer = MetaTrainer(config, build_problem(config, "cuda"), tmp_path)
    trainer.train()
    assert all(torch.isfinite(v).all() for v in trainer.meta_params().values())
