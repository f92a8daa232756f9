"""Sparse masks and FLOPs on a timm ViT (docs/design.md, "Sparse masks on transformers"), the ViT32 model, and
the cifar10_vit preset running PFFDST in CI.

The small ViT below: 32x32 input, 8x8 patches -> N = 16 + 1 tokens, width D = 32, 2 blocks, 2 heads, MLP 4D,
10 classes. Every expected number is worked out by hand from those sizes."""

import pytest
import torch

from fl_sparse.config.compose import compose
from fl_sparse.core.errors import ConfigError
from fl_sparse.engine.loop import run_rounds
from fl_sparse.engine.server import RoundServer
from fl_sparse.models import maskable_names
from fl_sparse.models.vit import vit32
from fl_sparse.parts.mask_policies import RandomMask
from fl_sparse.parts.schedules import Constant
from fl_sparse.sparse.budgets import ERK, Uniform
from fl_sparse.sparse.mask_ops import active_counts
from fl_sparse.training.accounting import forward_macs, training_flops
from fl_sparse.training.client import generator

N, D, DEPTH, CLASSES, PATCH = 17, 32, 2, 10, 8
BLOCK = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
MASKED = (["patch_embed.proj.weight"] + [f"blocks.{b}.{name}" for b in range(DEPTH) for name in BLOCK]
          + ["head.weight"])
SIZES = {"patch_embed.proj.weight": D * 3 * PATCH * PATCH, "attn.qkv.weight": 3 * D * D, "attn.proj.weight": D * D,
         "mlp.fc1.weight": 4 * D * D, "mlp.fc2.weight": 4 * D * D, "head.weight": CLASSES * D}


def small_vit():
    torch.manual_seed(0)
    return vit32(CLASSES, depth=DEPTH, embed_dim=D, num_heads=2, patch_size=PATCH)


def size(name):
    return SIZES[name.split(".", 2)[-1] if name.startswith("blocks.") else name]


def test_masked_and_dense_tensors():
    model = small_vit()
    assert maskable_names(model) == MASKED
    dense = [name for name, _ in model.named_parameters() if name not in MASKED]
    assert set(dense) == ({"cls_token", "pos_embed", "patch_embed.proj.bias", "norm.weight", "norm.bias", "head.bias"}
                          | {f"blocks.{b}.{layer}.{p}" for b in range(DEPTH) for p in ("weight", "bias")
                             for layer in ("norm1", "norm2")}
                          | {f"blocks.{b}.{name[:-len('weight')]}bias" for b in range(DEPTH) for name in BLOCK})


def shapes():
    params = dict(small_vit().named_parameters())
    return {name: tuple(params[name].shape) for name in MASKED}


def test_erk_counts_by_hand():
    # ERK: density ~ sum(shape) / prod(shape), so count ~ scale * sum(shape). Masked weights: 6144 + 2 x 12288 + 320
    # = 31040; at s = 0.8 keep round(0.2 x 31040) = 6208. Sums of dims: patch 32+3+8+8 = 51, qkv 128, proj 64,
    # fc1/fc2 160, head 42; total 51 + 2 x 512 + 42 = 1117, scale = 6208 / 1117 = 5.5577 (no layer saturates).
    # Raw counts: patch 283.44, qkv 711.39, proj 355.70, fc 889.24, head 233.43; floors sum to 6204 and the 4
    # missing go to the largest remainders: both proj (.70), patch (.44), head (.43).
    counts = ERK().counts(shapes(), 0.8)
    expected = {"patch_embed.proj.weight": 284, "head.weight": 234}
    for b in range(DEPTH):
        expected.update({f"blocks.{b}.attn.qkv.weight": 711, f"blocks.{b}.attn.proj.weight": 356,
                         f"blocks.{b}.mlp.fc1.weight": 889, f"blocks.{b}.mlp.fc2.weight": 889})
    assert counts == expected and sum(counts.values()) == 6208
    # The narrow dimension dominates: the 10 x 32 head keeps 73 %, the attention projection 35 %, qkv and the MLP
    # 22-23 %, the patch embedding (fan-in 192) 4.6 %.
    assert counts["head.weight"] / 320 == pytest.approx(0.73, abs=0.01)
    assert counts["patch_embed.proj.weight"] / 6144 == pytest.approx(0.046, abs=0.001)


def test_uniform_counts_by_hand():
    # 0.2 x each size: patch 1228.8, qkv 614.4, proj 204.8, fc 819.2, head 64; floors 1228 + 2 x 2456 + 64 = 6204,
    # the 4 missing go to the largest remainders: patch and both proj (.8), then qkv (.4) of block 0 (name order
    # breaks the tie with block 1).
    counts = Uniform().counts(shapes(), 0.8)
    assert sum(counts.values()) == 6208
    assert counts["patch_embed.proj.weight"] == 1229 and counts["head.weight"] == 64
    assert [counts[f"blocks.{b}.attn.proj.weight"] for b in range(DEPTH)] == [205, 205]
    assert [counts[f"blocks.{b}.attn.qkv.weight"] for b in range(DEPTH)] == [615, 614]
    assert [counts[f"blocks.{b}.mlp.fc1.weight"] for b in range(DEPTH)] == [819, 819]


def test_initial_mask_covers_exactly_the_maskable_tensors():
    model = small_vit()
    policy = RandomMask(ERK())
    policy.setup(model, Constant(0.8))
    weights = {name: t.detach() for name, t in model.state_dict().items()}
    mask = policy.initial_mask(weights, generator(0, "mask", 0))
    assert list(mask) == MASKED
    assert active_counts(mask) == ERK().counts(shapes(), 0.8)


def hand_macs():
    """Forward MACs of one sample: linear = tokens x out x in, patch conv = patches x D x (3 x 8 x 8)."""
    per_block = {"attn.qkv.weight": N * 3 * D * D, "attn.proj.weight": N * D * D,
                 "mlp.fc1.weight": N * 4 * D * D, "mlp.fc2.weight": N * 4 * D * D}
    macs = {"patch_embed.proj.weight": 16 * D * 3 * PATCH * PATCH, "head.weight": CLASSES * D}
    for b in range(DEPTH):
        macs.update({f"blocks.{b}.{name}": value for name, value in per_block.items()})
        # scores q k^T: heads x N x N x head_dim = N x N x D; values attn v: the same again
        macs[f"blocks.{b}.attn:weightless"] = 2 * N * N * D
    return macs


@pytest.mark.parametrize("fused", [True, False])
def test_forward_macs_by_hand(fused):
    model = small_vit()
    for block in model.blocks:
        block.attn.fused_attn = fused  # F.scaled_dot_product_attention, or q @ k.transpose spelled out
    assert forward_macs(model) == hand_macs()


def test_training_flops_count_attention_products_dense():
    model = small_vit()
    macs = forward_macs(model)
    mask = {name: torch.zeros(size(name), dtype=torch.bool) for name in MASKED}
    for name in MASKED:
        mask[name][: size(name) // 4] = True  # density exactly 1/4 in every masked tensor
    frozen = {name: torch.zeros_like(m) for name, m in mask.items()}
    frozen["head.weight"][:10] = True  # 10 of the head's 80 active weights skip their weight gradient
    hand = hand_macs()
    weighted = sum(v for k, v in hand.items() if not k.endswith(":weightless"))
    attention = sum(v for k, v in hand.items() if k.endswith(":weightless"))
    head_saving = 2 * hand["head.weight"] * 10 / 320  # weight-gradient phase of the frozen head weights
    # masked layers: 2 x MACs x (2 x 1/4 + 1/4); attention products: 2 x MACs x 3 whatever the mask
    per_sample = 2 * weighted * 0.75 + 6 * attention - head_saving
    assert training_flops(macs, mask, frozen, 5) == pytest.approx(5 * per_sample, rel=1e-12)
    assert training_flops(macs, {}, {}, 1) == pytest.approx(6 * (weighted + attention), rel=1e-12)


def test_vit32_checks_its_sizes():
    with pytest.raises(ConfigError, match="ViT32.patch_size"):
        vit32(10, patch_size=5)
    with pytest.raises(ConfigError, match="ViT32.embed_dim"):
        vit32(10, embed_dim=30, num_heads=4)


def test_vit_preset_sizes_are_gin_parameters():
    model = compose("fedavg", ["cifar10_vit"], ["ViT32.depth = 2", "ViT32.embed_dim = 48", "ViT32.num_heads = 3",
                                              "ViT32.patch_size = 4"]).experiment.model(10)
    assert len(model.blocks) == 2 and model.embed_dim == 48 and model.blocks[0].attn.num_heads == 3
    assert model.patch_embed.num_patches == 64


def test_pffdst_runs_two_rounds_on_the_vit_preset(one_thread):
    """CI: the cifar10_vit preset (400 clients of the embedded subset, 20 per round) under PFFDST."""
    sim = RoundServer(compose("pffdst", ["cifar10_vit"], ["ROUNDS = 2"]).experiment)
    state = sim.initial_state()
    assert list(state.mask) == maskable_names(sim.model)
    events = []
    state = run_rounds(sim, state, callbacks=[events.append]).state
    assert state.round == 2 and [e.evaluated for e in events] == [True, True]
    metrics = events[-1].metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert metrics["flops"] > 0 and metrics["uplink_bytes"] > 0
    for name, m in state.mask.items():
        assert torch.all(state.weights[name][~m] == 0), name
    # Two stages of one round: stage 1 ran at s1 - f1 = 0.85 and froze its 15 % of the masked weights; stage 2
    # grew to s2 - f2 = 0.75 and, in its last round, pruned to s = 0.8. The rest of the model stays dense.
    assert metrics["frozen_fraction"] == pytest.approx(0.15, abs=1e-4)
    assert metrics["density"] == pytest.approx(0.2, abs=1e-4)
    assert torch.count_nonzero(state.weights["pos_embed"]) == state.weights["pos_embed"].numel()


@pytest.mark.kernels
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap has no batching rule for the CPU sdpa
def test_vectorized_matches_sequential_on_the_vit_preset(one_thread):
    """A FedDST round that readjusts (client prune + regrow by |gradient|) trains the same under both executors:
    vmap loops over the fused CPU attention kernel, which gives the same values up to float rounding."""
    from helpers import simulation
    from test_executors import assert_same_results, run_both, tasks_for

    sim = simulation("feddst", "Readjusting.readjust_every = 1", rounds=4, presets=("cifar10_vit",))
    sequential, vectorized = run_both(sim, tasks_for(sim, sim.initial_state()), 1)
    assert_same_results(sequential, vectorized)
