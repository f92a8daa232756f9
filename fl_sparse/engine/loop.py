"""The round loop: plays a server's rounds until a stop condition holds.

A round is played by ``play_round(state) -> (state, metrics)``: :meth:`RoundServer.play_round` with
in-process clients, or a remote runtime's player of the same steps (Flower's ServerApp). The loop owns what
happens between rounds, the same for every player: the stop conditions (the planned rounds, the
communication budget, a callback's stop signal), evaluation every ``eval_every`` rounds, the freeze
policy's ``observe`` hook, and the callbacks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from fl_sparse.core.state import RoundEvent, ServerState
from fl_sparse.engine.server import RoundServer

#: Called after every round; returning True stops the run after that round (a stop signal).
RoundCallback = Callable[[RoundEvent], "bool | None"]
PlayRound = Callable[[ServerState], "tuple[ServerState, dict[str, float]]"]

ROUNDS, BUDGET, CALLBACK = "rounds", "budget", "callback"  # why a loop ended


@dataclasses.dataclass
class LoopEnd:
    """The state after the last round played, and why the loop ended (:data:`ROUNDS`, :data:`BUDGET` or
    :data:`CALLBACK`)."""

    state: ServerState
    stopped_by: str


def budget_allows(server: RoundServer, candidate: ServerState) -> bool:
    """With ``Experiment.budget_gb``, a round whose measured bytes take the cumulative total over the budget
    is discarded and ends the run."""
    budget_gb = server.experiment.budget_gb
    return budget_gb is None or candidate.cumulative_bytes <= budget_gb * 1e9


def run_rounds(server: RoundServer, state: ServerState | None = None, callbacks: list[RoundCallback] = (),
               play_round: PlayRound | None = None) -> LoopEnd:
    """Play the rounds after ``state`` (default: the initial state) up to ``Experiment.rounds``."""
    exp, play_round = server.experiment, play_round or server.play_round
    state = state or server.initial_state()
    while state.round < exp.rounds:
        candidate, metrics = play_round(state)
        if not budget_allows(server, candidate):
            return LoopEnd(state, BUDGET)
        state = candidate
        evaluated = state.round % exp.eval_every == 0 or state.round == exp.rounds
        if evaluated:
            metrics.update(server.evaluate(state.weights))
            exp.freeze_policy.observe(state.round, state.weights, state.mask, metrics)
        event = RoundEvent(state.round, metrics, state, evaluated)
        stop = [callback(event) for callback in callbacks]  # every callback sees the round, then any may stop
        if any(stop) and state.round < exp.rounds:
            return LoopEnd(state, CALLBACK)
    return LoopEnd(state, ROUNDS)
