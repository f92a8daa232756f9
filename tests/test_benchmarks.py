"""The round-time benchmark runs end to end and prints its table with the vectorized/sequential ratio."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def round_time():
    spec = importlib.util.spec_from_file_location("round_time", ROOT / "benchmarks" / "round_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_prints_the_table_with_the_ratio(round_time, capsys):
    round_time.main(["--quick", "--algorithms", "feddst", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "plain PyTorch lenet training" in out and "evaluate() on the full test set" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("feddst")]
    assert [row[1] for row in rows] == ["sequential", "vectorized"]
    seconds = [float(row[2]) for row in rows]
    assert all(s > 0 for s in seconds)
    ratio = rows[1][-2]  # seq/this, then "vs plain b640"
    assert ratio.endswith("x") and float(ratio[:-1]) == pytest.approx(seconds[0] / seconds[1], abs=0.01)
    assert "device cpu" in out


@pytest.mark.kernels
def test_plain_baseline_uses_stock_torch_layers(round_time):
    import torch
    from fl_sparse.models import LeNet

    ours = LeNet(10)
    stock = round_time._with_stock_layers(LeNet(10))
    stock.load_state_dict(ours.state_dict())
    assert type(stock.pool) is torch.nn.MaxPool2d and type(ours.pool) is not torch.nn.MaxPool2d
    assert all(type(m).__module__.startswith("torch.nn.") for m in stock.modules() if m is not stock)
    pooled = {"stock": [], "ours": []}  # each model's pooled maps, in call order
    for name, model in (("stock", stock), ("ours", ours)):
        model.pool.register_forward_hook(lambda module, args, out, name=name: pooled[name].append(out))
    x = torch.randn(4, 3, 32, 32)
    want, got = stock(x), ours(x)
    # The first pooled map is the same computation on the same input: bitwise (tests/test_layers.py covers
    # the pool itself). From there on the two maps hold the same values in different memory layouts
    # (contiguous NCHW from nn.MaxPool2d, channels-last from ours), so conv2 runs another oneDNN kernel,
    # which sums in another order: the logits differ in the last bits (6e-8 on an AVX2 host), hence a tolerance.
    assert torch.equal(pooled["ours"][0], pooled["stock"][0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
