"""The equivariant core in one page: read a batch of networks as a weight space, check that a
DWSNet commutes with hidden-neuron permutations, and train an invariant metanetwork to predict
what each network computes (its mean output on a probe set) from its weights alone."""

import torch
from torch import nn

from metaopt import WeightSpace, random_hidden_perms
from metaopt.models import DWSNet, InvariantDWSNet


def make_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():  # vary the scale so the target is not trivial
        for p in net.parameters():
            p.mul_(0.5 + 2 * torch.rand(()))
    return net


def main(steps: int = 300):
    nets = [make_net(s) for s in range(512)]
    ws = WeightSpace.from_modules(nets)
    probe = torch.linspace(-1, 1, 64).view(-1, 1).expand(64, 2) * torch.tensor([1.0, -1.0])
    with torch.no_grad():
        target = torch.stack([net(probe).mean() for net in nets])[:, None]

    edit = DWSNet(ws.spec, in_channels=1, out_channels=1)
    perms = random_hidden_perms(ws.spec)
    err = max((a - b).abs().max().item()
              for a, b in zip(edit(ws.permute_hidden(perms)).tensors(), edit(ws).permute_hidden(perms).tensors()))
    print(f"{ws}\nDWSNet equivariance error under a random hidden permutation: {err:.2e}")

    model = InvariantDWSNet(ws.spec, in_channels=1, out_features=1, hidden_channels=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train, test = slice(0, 448), slice(448, 512)
    pick = lambda s: WeightSpace([w[s] for w in ws.weights], [b[s] for b in ws.biases], ws.spec)
    baseline = ((target[test] - target[train].mean()) ** 2).mean().item()
    for step in range(steps + 1):
        loss = ((model(pick(train)) - target[train]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                test_mse = ((model(pick(test)) - target[test]) ** 2).mean().item()
            print(f"step {step:4d}  train mse {loss.item():.4f}  test mse {test_mse:.4f}  "
                  f"(predicting the mean: {baseline:.4f})")


if __name__ == "__main__":
    main()
