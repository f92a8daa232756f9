"""Every shipped gin file parses and builds an experiment; presets compose with every algorithm."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fl_sparse.config import gin_files as configs
from fl_sparse.config.compose import compose

ALGORITHMS = configs.available(configs.ALGORITHMS)
PRESETS = configs.available(configs.REGISTRY)


def test_the_documented_algorithms_and_presets_ship():
    assert set(ALGORITHMS) >= {"fedavg", "fedavgm", "fedprox", "random_mask", "feddst", "feddst_fedprox",
                               "pffdst", "pffdst_wo_pf", "pffdst_wo_smr", "sparsyfed"}
    assert set(PRESETS) >= {"cifar10_lenet", "cifar10_resnet18", "demo", "table1_4gb"}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_builds_with_every_preset(algorithm, preset):
    # builds every part and validates it; no data is loaded. rounds=40 binds ROUNDS and PFFDST_ROUNDS alike
    experiment = compose(algorithm, [preset], ["DATA_DIR = '/unused'"], rounds=40).experiment
    assert experiment.rounds == 40


def test_lenet_preset_has_the_papers_setting():
    experiment = compose("pffdst", ["cifar10_lenet"], []).experiment
    assert (experiment.num_clients, experiment.clients_per_round, experiment.dirichlet_alpha,
            experiment.batch_size, experiment.local_epochs) == (400, 20, 0.1, 32, 2)
    assert (experiment.optimizer.lr, experiment.optimizer.momentum, experiment.optimizer.weight_decay) == (0.01, 0.9, 1e-3)
    schedule = experiment.schedule
    assert (schedule.stage1_sparsity, schedule.stage2_sparsity, schedule.differential) == pytest.approx((0.9, 0.8, 0.05))
    experiment = compose("feddst", ["cifar10_resnet18"], []).experiment
    assert experiment.num_clients == 200 and experiment.local_epochs == 3


def test_sparsity_macro_reaches_every_sparse_algorithm():
    for algorithm in ["random_mask", "feddst", "pffdst", "pffdst_wo_pf", "pffdst_wo_smr"]:
        assert compose(algorithm, [], ["SPARSITY = 0.9", "ROUNDS = 40"]).experiment.schedule.phase(40).sparsity == pytest.approx(0.9), algorithm


def test_gin_files_can_be_given_by_path(tmp_path):
    custom = tmp_path / "mine.gin"
    custom.write_text("include 'fedavg.gin'\nSGD.lr = 0.05\n")
    assert compose(str(custom), [], []).experiment.optimizer.lr == 0.05


@pytest.mark.slow
def test_wheel_ships_the_gin_files(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True)
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fl_sparse/_gin/algorithms/pffdst.gin" in names
    assert "fl_sparse/_gin/registry/cifar10_lenet.gin" in names
    assert "fl_sparse/data/embedded/cifar10_subset.npz" in names


def test_table_presets_give_each_family_its_equal_budget_rounds():
    rounds = {}
    for algorithm in ["fedavgm", "fedprox", "feddst", "feddst_fedprox", "pffdst", "pffdst_wo_pf", "pffdst_wo_smr"]:
        experiment = compose(algorithm, ["table1_4gb"], ["DATA_DIR = '/unused'"]).experiment
        assert experiment.budget_gb == pytest.approx(5.7949)
        rounds[algorithm] = experiment.rounds
    # Freezing halves a round's payload, so only the freezing methods get PFFDST's 350 rounds.
    assert rounds["feddst"] == rounds["feddst_fedprox"] == rounds["pffdst_wo_pf"] == 200
    assert rounds["pffdst"] == rounds["pffdst_wo_smr"] == 350
    experiment = compose("pffdst", ["table1_16gb"], ["DATA_DIR = '/unused'"]).experiment
    assert experiment.rounds == 1400 and experiment.budget_gb == pytest.approx(4 * 5.7949, abs=1e-3)


def test_params_name_every_macro_and_resolve_macro_references():
    compose("pffdst", ["table1_4gb"], ["DATA_DIR = '/unused'"])
    params = configs.bindings_as_params()
    assert params["macros/ROUNDS"] == "200" and params["macros/PFFDST_ROUNDS"] == "350"
    assert params["macros/SPARSITY"] == "0.8"
    assert params["Experiment.rounds"] == params["TwoStage.rounds"] == "350"  # not "%PFFDST_ROUNDS"
    assert params["TwoStage.sparsity"] == "0.8"
    assert "macro.value" not in params
