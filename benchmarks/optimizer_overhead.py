"""Overhead of MetaNetOptimizer against torch.optim.Adam, measured in the same run.

    python benchmarks/optimizer_overhead.py [--reps 30] [--device cpu|cuda] [--learned FILE] [--refresh-every K]

For each model: the whole training iteration (zero_grad, forward, backward, step on a batch of
128 from a pool of ``--batches`` random batches, cycled) and the optimizer step alone, medians over
interleaved repetitions (Adam, ours, Adam, ...), reported as ours / Adam. A repetition is as many
iterations as the metanetwork's refresh period (after the warm-up: ``late_refresh_every`` if the
rule has one), timed as a mean, so every number includes the amortised metanetwork cost. Timing
starts after the rule's warm-up steps: past ``amsgrad_from`` (AMSGrad's running maximum, one more
tensor in the fused kernel; the shipped default's from step 300) and past ``distance_warmup``
(Prodigy's step size, where the estimate is updated every step and the metanetwork may run more
often): the steady state of most of a run.
Goals: whole iteration <= 1.5x Adam on CPU for 100k+ parameter models, <= 1.2x on GPU for 10M+.
``--compile`` measures ``MetaNetOptimizer(compile=True)`` (its first step compiles, tens of
seconds on a small CPU; the warm-up iterations absorb that). The learned optimizer
is the shipped default (what ``MetaNetOptimizer(params)`` runs) unless ``--learned`` names another;
``--refresh-every K`` overrides how often its metanetwork runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from metaopt import LearnedOptimizer, MetaNetOptimizer
from metaopt.cpu import tune_malloc
from metaopt.optim import DEFAULT_PATH, load_learned


def mlp(*sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


MODELS = {
    "mlp-100k (784-128-10)": (lambda: mlp(784, 128, 10), (784,)),
    "mlp-1M (784-1024-256-10)": (lambda: mlp(784, 1024, 256, 10), (784,)),
    "cnn (16-32 conv, 28x28)": (lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10)), (1, 28, 28)),
    "mlp-10M (784-4096-2048-10)": (lambda: mlp(784, 4096, 2048, 10), (784,)),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def learned_for_benchmark(path=DEFAULT_PATH, refresh_every=None) -> LearnedOptimizer:
    learned = load_learned(path)
    if refresh_every is None:
        return learned
    return learned.with_config(refresh_every=refresh_every, late_refresh_every=None)  # k throughout


def measure(name, device, reps, batch, learned, compile=False, batches=32):
    make, in_shape = MODELS[name]
    torch.manual_seed(0)
    nets = {"adam": make().to(device), "ours": make().to(device)}
    opts = {"adam": torch.optim.Adam(nets["adam"].parameters(), lr=1e-3),
            "ours": MetaNetOptimizer(nets["ours"].parameters(), learned=learned, compile=compile)}
    # a pool of batches, cycled: one batch seen hundreds of times is memorised, its gradients decay
    # to denormal floats, and every pass over them is slow on x86 CPUs (not what training sees)
    xs = torch.randn(batches, batch, *in_shape, device=device)
    ys = torch.randint(0, 10, (batches, batch), device=device)
    whole, step_only = {k: [] for k in nets}, {k: [] for k in nets}
    seen = {k: 0 for k in nets}

    def iteration(k):
        i = seen[k] = seen[k] + 1
        opts[k].zero_grad()
        F.cross_entropy(nets[k](xs[i % batches]), ys[i % batches]).backward()
        sync(device)
        t0 = time.perf_counter()
        opts[k].step()
        sync(device)
        return time.perf_counter() - t0

    # a block is one refresh period: the metanetwork runs once per block, so block means are the
    # amortised cost (a median of single iterations would pick the cheap steps between refreshes).
    # With amsgrad_from set, the warm-up runs past it (its running maximum of v is one more pass), and
    # past distance_warmup with step_size "prodigy" (until then the estimate is updated every step):
    # the steady state of a training run, not its first steps
    c = learned.config
    first_steady = max(c.amsgrad_from or 0, c.distance_warmup if c.step_size == "prodigy" or c.late_refresh_every
                       else 0)
    block = learned.refresh_period(first_steady + 1)  # after the warm-up, late_refresh_every if set
    for _ in range(max(3, -(-first_steady // block))):
        for k in nets:
            for _ in range(block):
                iteration(k)
    for _ in range(reps):
        for k in nets:
            sync(device)
            t0 = time.perf_counter()
            step_only[k].append(sum(iteration(k) for _ in range(block)) / block)
            whole[k].append((time.perf_counter() - t0) / block)
    med = lambda xs: statistics.median(xs) * 1e3
    params = sum(p.numel() for p in nets["ours"].parameters())
    return params, med(whole["adam"]), med(whole["ours"]), med(step_only["adam"]), med(step_only["ours"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=32,
                    help="distinct batches, cycled (1: the same batch every iteration, as before 2026-12-05)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None, help="substrings of model names to run")
    ap.add_argument("--compile", action="store_true",
                    help="MetaNetOptimizer(compile=True); the warm-up absorbs the compilation")
    ap.add_argument("--learned", default=DEFAULT_PATH, help="learned optimizer file (default: the shipped one)")
    ap.add_argument("--refresh-every", type=int, default=None,
                    help="run the metanetwork every K steps (default: the file's config)")
    args = ap.parse_args()
    learned = learned_for_benchmark(args.learned, args.refresh_every)
    device = torch.device(args.device)
    names = [n for n in MODELS if args.models is None or any(m in n for m in args.models)]
    if device.type == "cpu" and args.models is None:
        names = [n for n in names if "10M" not in n]  # the 10M model is the GPU goal
    tuned = tune_malloc()
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.batches} reps={args.reps} "
          f"torch={torch.__version__} malloc_tuned={tuned} compile={args.compile} "
          f"max_mix={learned.config.max_mix} refresh_every={learned.config.refresh_every} "
          f"late_refresh_every={learned.config.late_refresh_every}")
    header = f"{'model':<28} {'params':>10} {'iter Adam ms':>12} {'iter ours ms':>12} {'iter ratio':>10} " \
             f"{'step Adam ms':>12} {'step ours ms':>12} {'step ratio':>10}"
    print(header)
    print("-" * len(header))
    for name in names:
        n, wa, wo, sa, so = measure(name, device, args.reps, args.batch, learned, args.compile, args.batches)
        print(f"{name:<28} {n:>10,} {wa:>12.2f} {wo:>12.2f} {wo / wa:>9.2f}x {sa:>12.2f} {so:>12.2f} {so / sa:>9.2f}x")


if __name__ == "__main__":
    main()
