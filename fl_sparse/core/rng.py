"""Keyed random streams: every random draw of a run is keyed by (seed, stream, round, client, ...), so the
seed in the config is all the RNG state there is, and a run resumed at round r redraws the same numbers."""

from __future__ import annotations

import numpy as np
import torch

STREAMS = {"sampling": 1, "mask": 2, "batches": 3, "init": 4, "discovery": 5}


def generator(seed: int, stream: str, *keys: int) -> torch.Generator:
    """A CPU generator keyed by (seed, stream, round, client, ...): the same keys redraw the same numbers,
    so a run resumed at round r reproduces sampling, growth and batch order."""
    state = np.random.SeedSequence([seed, STREAMS[stream], *keys]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
