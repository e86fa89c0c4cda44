"""benchmarks/policy_gradient.py: the learned optimizer on REINFORCE, reported as returns."""

import importlib.util
import re
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "policy_gradient.py"
_spec = importlib.util.spec_from_file_location("policy_gradient", _PATH)
pg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pg)


def test_the_benchmark_reports_every_optimizer_and_draws_the_returns(tmp_path):
    pg.main(["--steps", "4", "--every", "2", "--seeds", "1", "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "optimizer" not in line]
    names = list(pg.optimizers(str(pg.DEFAULT_PATH))) * len(pg.FORMULATIONS)  # each loss, every optimizer
    assert len(rows) == len(names)
    for row, name in zip(rows, names):
        assert name in row
        returns = [float(x) for x in re.findall(r"\| ([\d.]+)", row)]
        assert len(returns) == 2 and all(1 <= r <= 500 for r in returns)  # CartPole: 1 to 500 per episode
    assert (tmp_path / "returns.png").stat().st_size > 0


def test_every_must_fit_in_the_steps(tmp_path):
    with pytest.raises(SystemExit):
        pg.main(["--steps", "4", "--every", "8", "--out", str(tmp_path)])
