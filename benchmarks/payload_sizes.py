"""Measured uplink bytes per client next to their closed forms, for FedDST and both PFFDST stages.

    python benchmarks/payload_sizes.py [--data-dir DIR] [--sparsity 0.8]

Runs the LeNet preset (cifar10_lenet) for a few rounds with short readjustment schedules, so every
phase appears: FedDST at s, PFFDST stage 1 at s1 - f1 and s1, stage 2 at s2 - f2 and s2. "measured" is
the mean length of the encoded uplink payloads of the round; "closed form" is the codec's exact size
formula for the global state sent that round; "fp32 non-zeros" is the appendix's estimate
(4 bytes per non-zero, no mask or index overhead).
"""

from __future__ import annotations

import argparse

from fl_sparse.config.compose import compose
from fl_sparse.core.interfaces import Link, Message
from fl_sparse.engine.server import RoundServer


def measure(algorithm: str, bindings: list[str], rounds: int, data_dir: str | None, sparsity: float):
    extra = [f"ROUNDS = {rounds}", f"SPARSITY = {sparsity}", "Experiment.local_epochs = 1",
             "Experiment.eval_every = 100000"]
    if data_dir:
        extra.append(f"DATA_DIR = {data_dir!r}")
    sim = RoundServer(compose(algorithm, ["cifar10_lenet"], extra + bindings).experiment)
    state = sim.initial_state()
    for _ in range(rounds):
        link = Link("up", 0, state.frozen, state.weights, state.freeze_version)
        message = Message(state.weights, state.mask)
        codec = sim.experiment.uplink_codec
        closed = (codec.closed_form_size(message, link) if "link" in codec.closed_form_size.__code__.co_varnames
                  else codec.closed_form_size(message))
        sent = sum(int((m & ~state.frozen[n]).sum()) if n in state.frozen else int(m.sum())
                   for n, m in state.mask.items())
        dense = sum(t.numel() for n, t in state.weights.items() if n not in state.mask and t.is_floating_point())
        density = sum(int(m.sum()) for m in state.mask.values()) / sum(m.numel() for m in state.mask.values())
        stage = sim.experiment.schedule.phase(state.round + 1).stage
        state, metrics = sim.play_round(state)
        yield state.round, stage, density, metrics["uplink_bytes_per_client"], closed, 4 * (sent + dense)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--sparsity", type=float, default=0.8)
    args = parser.parse_args()
    print("| algorithm | round | stage | density | measured B/client | closed form B | fp32 non-zeros B |")
    print("|---|---|---|---|---|---|---|")
    runs = [("feddst", ["Readjusting.readjust_every = 1"], 2),
            ("pffdst", ["TwoStage.readjust_every = 1", "TwoStage.readjust_until = 2"], 8)]
    for algorithm, bindings, rounds in runs:
        for r, stage, density, measured, closed, estimate in measure(algorithm, bindings, rounds, args.data_dir,
                                                                     args.sparsity):
            print(f"| {algorithm} | {r} | {stage + 1} | {density:.4f} | {measured:,.0f} | {closed:,} | {estimate:,} |")


if __name__ == "__main__":
    main()
