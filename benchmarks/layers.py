"""Forward+backward time and peak memory of metaopt's NP and DWS stacks against nfn's
NPLinear/HNPLinear stacks, on the same shapes in the same run (batch 64).

    python benchmarks/layers.py [--reps 10] [--channels 16] [--device cpu|cuda]

Each stack is linear(1->C), relu, linear(C->C), relu, linear(C->1). Timings interleave ours and
nfn's rep by rep, so machine noise hits both alike; the table shows medians and ratios (nfn / ours:
above 1 means we are faster). Peak memory is measured in a fresh subprocess per configuration
(peak RSS on CPU, max_memory_allocated on CUDA) above what the inputs and parameters take.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

SHAPES = {"2-32-32-1": (2, 32, 32, 1), "64-32-32-10": (64, 32, 32, 10), "784-128-10": (784, 128, 10)}
NFN_PARAM_LIMIT = 50_000_000  # nfn's HNPLinear on 784 inputs has ~370M parameters per layer; we skip it


def make_input(sizes, batch, device):
    from metaopt import WeightSpace

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(batch, 1, b, a, generator=g) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [torch.randn(batch, 1, b, generator=g) for b in sizes[1:]]
    return WeightSpace([w.to(device) for w in ws], [b.to(device) for b in bs])


def build(impl, spec_ws, channels):
    """Returns (module, forward(ws) -> list of output tensors)."""
    widths = [1, channels, channels, 1]
    if impl in ("ours-np", "ours-dws"):
        from metaopt.layers import DWSLinear, NPLinear

        make = (lambda a, b: NPLinear(spec_ws.spec, a, b, io_embed=True)) if impl == "ours-np" \
            else (lambda a, b: DWSLinear(spec_ws.spec, a, b))
        layers = nn.ModuleList(make(a, b) for a, b in zip(widths[:-1], widths[1:]))

        def forward(ws):
            for i, layer in enumerate(layers):
                ws = layer(ws)
                if i < len(layers) - 1:
                    ws = ws.map(torch.relu)
            return ws.tensors()
        return layers, forward
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
    from nfn.layers import HNPLinear, NPLinear

    nspec = network_spec_from_wsfeat(WeightSpaceFeatures(spec_ws.weights, spec_ws.biases), set_all_dims=True)
    make = (lambda a, b: NPLinear(nspec, a, b, io_embed=True)) if impl == "nfn-np" else (lambda a, b: HNPLinear(nspec, a, b))
    layers = nn.ModuleList(make(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(ws):
        x = WeightSpaceFeatures(ws.weights, ws.biases)
        for i, layer in enumerate(layers):
            x = layer(x)
            if i < len(layers) - 1:
                x = x.map(torch.relu)
        return list(x.weights) + list(x.biases)
    return layers, forward


def nfn_hnp_params(sizes, channels):
    """Parameter count of nfn's HNPLinear stack, from its construction formula, without building it."""
    try:
        from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
        from nfn.layers import HNPLinear
    except ImportError:
        return None
    ws = make_input(sizes, 1, "cpu")
    spec = network_spec_from_wsfeat(WeightSpaceFeatures(ws.weights, ws.biases), set_all_dims=True)
    with torch.device("meta"):
        return sum(p.numel() for a, b in ((1, channels), (channels, channels), (channels, 1))
                   for p in HNPLinear(spec, a, b).parameters())


def step(forward, ws):
    loss = sum((t ** 2).mean() for t in forward(ws))
    loss.backward()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(pair, ws, reps, device):
    times = {name: [] for name, _ in pair}
    for _ in range(2):  # warm-up
        for _, fwd in pair:
            step(fwd, ws)
    for _ in range(reps):
        for name, fwd in pair:
            sync(device)
            t0 = time.perf_counter()
            step(fwd, ws)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory_child(impl, shape, channels, batch, device):
    """Runs in a subprocess: bytes of peak memory that one fwd+bwd adds."""
    ws = make_input(SHAPES[shape], batch, device)
    layers, fwd = build(impl, ws, channels)
    layers.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fwd, ws)
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * resource.getpagesize()
    step(fwd, ws)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def peak_memory(impl, shape, channels, batch, device):
    cmd = [sys.executable, __file__, "--child", json.dumps([impl, shape, channels, batch, device])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(peak_memory_child(*json.loads(args.child)))
        return
    try:
        import nfn  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/layers.py compares against nfn: pip install nfn==0.1.2 einops")

    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} channels={args.channels} "
          f"reps={args.reps} torch={torch.__version__}")
    header = f"{'shape':<12} {'layer':<4} {'ours ms':>9} {'nfn ms':>9} {'speedup':>8} {'ours MB':>9} {'nfn MB':>9} " \
             f"{'mem ratio':>9} {'ours params':>12} {'nfn params':>12}"
    print(header)
    print("-" * len(header))
    for shape in args.shapes:
        sizes = SHAPES[shape]
        ws = make_input(sizes, args.batch, args.device)
        for kind in ("np", "dws"):
            ours_name, nfn_name = f"ours-{kind}", f"nfn-{kind}"
            ours, ours_fwd = build(ours_name, ws, args.channels)
            ours.to(args.device)
            ours_params = sum(p.numel() for p in ours.parameters())
            nfn_params = nfn_hnp_params(sizes, args.channels) if kind == "dws" else None
            pair = [(ours_name, ours_fwd)]
            if nfn_params is None or nfn_params <= NFN_PARAM_LIMIT:
                theirs, theirs_fwd = build(nfn_name, ws, args.channels)
                theirs.to(args.device)
                nfn_params = sum(p.numel() for p in theirs.parameters())
                pair.append((nfn_name, theirs_fwd))
            t = time_pair(pair, ws, args.reps, args.device)
            mem = {} if args.no_memory else {n: peak_memory(n, shape, args.channels, args.batch, args.device) / 2**20
                                                for n, _ in pair}
            t_ours, t_nfn = t[ours_name] * 1e3, t.get(nfn_name, float("nan")) * 1e3
            m_ours, m_nfn = mem.get(ours_name, float("nan")), mem.get(nfn_name, float("nan"))
            nfn_note = f"{nfn_params:>12,}" + ("" if nfn_name in t else " (too big, not run)")
            print(f"{shape:<12} {kind:<4} {t_ours:>9.2f} {t_nfn:>9.2f} {t_nfn / t_ours:>7.2f}x {m_ours:>9.1f} "
                  f"{m_nfn:>9.1f} {m_nfn / m_ours:>8.2f}x {ours_params:>12,} {nfn_note}")


if __name__ == "__main__":
    main()
