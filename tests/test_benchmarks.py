"""The round-time benchmark runs end to end and prints its table with the vectorized/sequential ratio."""

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def round_time():
    return load_script("benchmarks/round_time.py")


def test_quick_benchmark_prints_the_table_with_the_ratio(round_time, capsys):
    round_time.main(["--quick", "--algorithms", "feddst", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "plain PyTorch lenet training" in out and "evaluate() on the full test set" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("feddst")]
    assert [row[1] for row in rows] == ["sequential", "vectorized"]
    seconds = [float(row[2]) for row in rows]
    assert all(s > 0 for s in seconds)
    ratio = rows[1][-3]  # seq/this, then "vs plain b32" and "vs plain b640"
    assert ratio.endswith("x") and float(ratio[:-1]) == pytest.approx(seconds[0] / seconds[1], abs=0.01)
    assert "device cpu" in out


def test_repeats_interleave_the_baselines_with_the_rounds(round_time, capsys, monkeypatch):
    """--repeats N runs every measurement N times, in reversed order every other time, and reports the median
    of the per-repetition ratios to plain batch 32. The workers are replaced by canned results: this tests the
    orchestration and the arithmetic, which real timings could not pin down."""
    calls = []
    plain_b32 = iter([1000.0, 2000.0, 1200.0])  # the machine's speed drifts between repetitions
    rounds = iter([1100.0, 2600.0, 1800.0])

    def canned(args, kind, **extra):
        calls.append((kind, extra.get("executor")))
        if kind == "plain":
            rate = next(plain_b32)
            return {"data": "canned", "plain_b32_samples_per_s": rate, "plain_b640_samples_per_s": 2 * rate,
                    "tuned_b32_samples_per_s": rate, "tuned_b640_samples_per_s": 2 * rate, "evaluate_s": 1.0,
                    "test_images": 10, "peak_rss_mb": 100.0}
        rate = next(rounds)
        return {"algorithm": extra["algorithm"], "executor": extra["executor"], "seconds": [7500 / rate],
                "median_s": 7500 / rate, "warmup_s": 1.0, "samples_per_s": rate, "samples_per_round": 7500,
                "peak_rss_mb": 100.0, "peak_gpu_mb": None, "worker_peak_rss_mb": [], "clients_per_round": 20,
                "epochs": 3, "batch_size": 32, "device": "cpu", "threads": 1, "readjust_rounds": 0}

    monkeypatch.setattr(round_time, "_run_worker", canned)
    round_time.main(["--algorithms", "feddst", "--executors", "sequential", "--repeats", "3"])
    out = capsys.readouterr().out
    assert calls == [("plain", None), ("rounds", "sequential"), ("rounds", "sequential"), ("plain", None),
                     ("plain", None), ("rounds", "sequential")]
    assert "medians of 3 interleaved repetitions" in out
    assert "per-repetition samples/s over plain b32: feddst sequential 1.10x, 1.30x, 1.50x" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("feddst"))
    assert row[-2:] == ["1.30x", "0.65x"]  # medians of per-repetition ratios, not the ratio of medians (1.50x)
    assert float(row[6]) == 1800  # samples/s: the median repetition


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
