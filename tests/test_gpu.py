"""On a CUDA machine: rounds run end to end on the GPU and give the CPU's results up to float rounding.
Skipped where no GPU is present (the CI machine has none); run ``pytest tests/test_gpu.py`` on one."""

import pytest
import torch
from helpers import load_script, simulation

from fl_sparse.engine.loop import run_rounds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# cuDNN and the CPU kernels sum in different orders; one LeNet round moves weights by ~1e-6 either way.
ATOL = 1e-4


@pytest.mark.kernels
@pytest.mark.parametrize("algorithm", ["fedavg", "feddst", "pffdst"])
@pytest.mark.parametrize("executor", ["@Sequential()", "@Vectorized()"])
def test_a_round_on_cuda_matches_the_cpu(algorithm, executor):
    states = {}
    for device in ("cpu", "cuda"):
        # 20 planned rounds: round 1 then neither readjusts nor prunes, so no magnitude ranking can flip
        sim = simulation(algorithm, f"Experiment.device = '{device}'", f"Experiment.executor = {executor}",
                         rounds=20)
        state, metrics = sim.play_round(sim.initial_state())
        assert sim.data.train_x.device.type == device and state.weights["fc1.weight"].device.type == device
        states[device] = (state, metrics)
    (cpu, cpu_metrics), (gpu, gpu_metrics) = states["cpu"], states["cuda"]
    for name, weight in cpu.weights.items():
        torch.testing.assert_close(gpu.weights[name].cpu(), weight, rtol=0, atol=ATOL, msg=name)
    for name, mask in cpu.mask.items():
        assert torch.equal(gpu.mask[name].cpu(), mask), name
    assert gpu_metrics["uplink_bytes"] == cpu_metrics["uplink_bytes"]


def test_sparsyfed_on_cuda_keeps_its_density():
    """SparsyFed's first round ranks every trained weight globally, so rounding differences between devices
    can swap weights at the threshold: check its invariants on the GPU rather than equality with the CPU."""
    sim = simulation("sparsyfed", "Experiment.device = 'cuda'", rounds=2)
    policy = sim.experiment.mask_policy
    state = run_rounds(sim).state
    assert bool(state.mask["conv1.weight"].all())
    assert sum(int(state.mask[n].sum()) for n in policy.pruned_names) == policy.count(0.8)
    assert all(torch.isfinite(w).all() for w in state.weights.values() if w.is_floating_point())


def test_benchmark_runs_on_cuda(capsys):
    round_time = load_script("benchmarks/round_time.py")
    round_time.main(["--quick", "--device", "cuda", "--algorithms", "feddst", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "device cuda" in out and "peak GPU MB" in out
