"""The one budget rule of the table presets (fl_sparse/budget_rule.py): FedDST's measured total for the column's
rounds. Each preset's bytes per client and round is measured again here, so a model or codec change that makes
it stale fails; the Table 3 presets run on a generated CIFAR-100 stand-in in the official layout."""

import pytest
import torch
from test_data import write_cifar100

from fl_sparse.config import gin_files as configs
from fl_sparse.config.budget import measure_feddst_bytes
from fl_sparse.config.compose import compose
from fl_sparse.core.errors import ConfigError
from fl_sparse.engine.server import RoundServer
from fl_sparse.parts.budget_rule import feddst_budget_gb

# first column of each table -> (num_classes, the paper's column labels in GB)
FIRST_COLUMNS = {"table1_4gb": (10, [4, 8, 12, 16]), "table2_s90_34gb": (10, [34, 68, 102, 136]),
                 "table2_s95_17gb": (10, [17, 34, 51, 68]), "table3_s90_34gb": (100, [34, 68, 102, 136]),
                 "table3_s95_17gb": (100, [17, 34, 51, 68]), "vit_cifar10_budget": (10, None),
                 "table1_4gb_authors": (10, None), "appendix_b_s98_lenet": (10, None),
                 "appendix_b_s99_lenet": (10, None)}


def test_the_rule_is_feddsts_total_rounded_up_to_a_tenth_of_a_megabyte():
    assert feddst_budget_gb(200, 20, 1_448_716) == 5.7949  # 5,794,864,000 B: the Table 1 4 GB column
    assert feddst_budget_gb(1, 1, 100_000) == 0.0001  # exact totals stay exact
    assert feddst_budget_gb(1, 1, 100_001) == 0.0002
    assert feddst_budget_gb(600, 20, 1_448_716) * 1e9 >= 600 * 20 * 1_448_716
    with pytest.raises(ConfigError, match="feddst_budget_gb"):
        feddst_budget_gb(0, 20, 1)


def bound(preset, *bindings):
    return compose("feddst", [preset], ["DATA_DIR = '/unused'", *bindings]).experiment


# Drawing ResNet-18's ERK mask takes ~2 s on an idle 2-core CPU (~10 s on a busy one): those four run with -m slow.
MEASURED = [pytest.param(p, marks=pytest.mark.slow) if p.startswith(("table2", "table3")) else p
            for p in sorted(FIRST_COLUMNS)]


@pytest.mark.parametrize("preset", MEASURED)
def test_preset_bytes_are_feddsts_measured_bytes(preset):
    num_classes, _ = FIRST_COLUMNS[preset]
    up, down = measure_feddst_bytes([preset], num_classes, ["DATA_DIR = '/unused'"])
    experiment = bound(preset)
    assert configs.gin.query_parameter("feddst_budget_gb.bytes_per_client_round") == up + down
    assert configs.gin.query_parameter("feddst_budget_gb.clients_per_round") == experiment.clients_per_round
    assert experiment.budget_gb == feddst_budget_gb(200, experiment.clients_per_round, up + down)
    assert experiment.budget_gb * 1e9 >= 200 * experiment.clients_per_round * (up + down)


@pytest.mark.parametrize("first", [p for p in sorted(FIRST_COLUMNS) if FIRST_COLUMNS[p][1]])
def test_columns_scale_rounds_and_budget(first):
    table, labels = first.rsplit("_", 1)[0], FIRST_COLUMNS[first][1]
    bound(first)
    per_round = (configs.gin.query_parameter("feddst_budget_gb.clients_per_round")
                 * configs.gin.query_parameter("feddst_budget_gb.bytes_per_client_round"))
    for k, gb in enumerate(labels, start=1):
        preset = f"{table}_{gb}gb"
        feddst = bound(preset)
        pffdst = compose("pffdst", [preset], ["DATA_DIR = '/unused'"]).experiment
        assert (feddst.rounds, pffdst.rounds) == (200 * k, 350 * k), preset
        assert feddst.budget_gb == pffdst.budget_gb == feddst_budget_gb(200 * k, 1, per_round), preset
        # k times the first column, up to the rounding up to 0.1 MB (at most 1e-4 GB per column)
        assert -1e-9 <= k * feddst_budget_gb(200, 1, per_round) - feddst.budget_gb < k * 1e-4, preset


@pytest.mark.parametrize("preset, sparsity", [("table2_s90_34gb", 0.9), ("table2_s95_17gb", 0.95),
                                              ("table3_s90_34gb", 0.9), ("table3_s95_17gb", 0.95)])
def test_resnet_presets_have_the_papers_setting(preset, sparsity):
    experiment = bound(preset)
    assert (experiment.num_clients, experiment.clients_per_round, experiment.dirichlet_alpha) == (200, 20, 0.1)
    assert type(experiment.dataset).__name__ == ("CIFAR10" if preset.startswith("table2") else "CIFAR100")
    assert experiment.schedule.phase(1).sparsity == pytest.approx(sparsity)
    assert experiment.model.__name__ == "resnet18"


def test_table3_preset_reads_a_users_cifar100_copy(tmp_path):
    write_cifar100(tmp_path, n_train=400, n_test=100)  # train/test/meta pickles, b"fine_labels", b"coarse_labels"
    experiment = compose("pffdst", ["table3_s90_34gb"], [f"DATA_DIR = '{tmp_path}'"]).experiment
    data = experiment.dataset.load(experiment.num_clients, experiment.dirichlet_alpha, 0)
    assert data.num_classes == 100 and len(data.client_train) == 200
    assert sum(len(idx) for idx in data.client_train) == 400
    assert experiment.model(data.num_classes).linear.out_features == 100


@pytest.mark.slow  # ResNet-18 on the CPU: ~15 s idle, over a minute on a busy 2-core machine
def test_table3_preset_runs_a_round_on_a_cifar100_stand_in(tmp_path):
    write_cifar100(tmp_path, n_train=400, n_test=100)
    sim = RoundServer(compose("pffdst", ["table3_s95_17gb"], [f"DATA_DIR = '{tmp_path}'", "Experiment.clients_per_round = 2",
                                                 "Experiment.local_epochs = 1"]).experiment)
    assert sim.data.num_classes == 100 and sim.data.source.startswith("CIFAR-100 from ")
    assert sim.model.linear.out_features == 100
    state, metrics = sim.play_round(sim.initial_state())
    assert state.round == 1 and metrics["uplink_bytes"] > 0
    # PFFDST's stage 1 at s1 - f1 = 0.975 - 0.0125 over ResNet-18's conv/linear weights
    assert metrics["density"] == pytest.approx(0.0375, abs=1e-4)
    assert sim.experiment.budget_gb == feddst_budget_gb(200, 20, 7_177_176)
    assert all(torch.isfinite(t).all() for t in state.weights.values() if t.is_floating_point())
