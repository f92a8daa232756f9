"""Checkpoints: the whole server state in safetensors + JSON (no pickle), written atomically.

A checkpoint is a directory ``round-NNNNNN`` holding ``tensors.safetensors`` (global weights, mask,
frozen set, server optimiser state, what the freeze and mask policies remember) and ``state.json`` (round, byte
and FLOP counters, codec state, what the run's callbacks keep (the MLflow run id), the gin config, and the
SHA-256 of the tensor file). It is written under a temporary
name and renamed, so a crash never leaves a half-written checkpoint under a real name; older ones are
removed only after a newer one is complete. Every random draw of a run is keyed by (seed, stream,
round, client), so the seed in the config is all the RNG state there is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from fl_sparse.core.errors import FlSparseError
from fl_sparse.core.state import RoundEvent, ServerState
from fl_sparse.engine.server import RoundServer
from fl_sparse.runtime.callbacks import Callback

FORMAT_VERSION = 1
KEEP = 2  # checkpoints kept, so a damaged newest one still leaves a good one behind


class CheckpointError(FlSparseError):
    """A checkpoint that is missing, truncated, tampered with or from another configuration."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(directory: Path, state: ServerState, extra: dict) -> Path:
    """Write the checkpoint of ``state`` (after round ``state.round``); ``extra`` is JSON data."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"round-{state.round:06d}"
    tmp = directory / f".round-{state.round:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"weights/{k}": v for k, v in state.weights.items()}
    tensors |= {f"mask/{k}": v for k, v in state.mask.items()}
    tensors |= {f"frozen/{k}": v for k, v in state.frozen.items()}
    tensors |= {f"server/{k}": v for k, v in extra.pop("server_tensors", {}).items()}
    tensors |= {f"freeze/{k}": v for k, v in extra.pop("freeze_tensors", {}).items()}
    tensors |= {f"policy/{k}": v for k, v in extra.pop("policy_tensors", {}).items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    meta = {"format": FORMAT_VERSION, "round": state.round, "freeze_version": state.freeze_version,
            "cumulative_bytes": state.cumulative_bytes, "cumulative_flops": state.cumulative_flops,
            "tensors_sha256": _sha256(tmp / "tensors.safetensors"), **extra}
    with open(tmp / "state.json", "w") as handle:
        json.dump(meta, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(directory.glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: Path) -> Path:
    checkpoints = sorted(Path(directory).glob("round-*"))
    if not checkpoints:
        raise CheckpointError(f"--resume {directory}: no checkpoint (round-NNNNNN) in that directory")
    return checkpoints[-1]


def load(path: Path) -> tuple[ServerState, dict]:
    """Read and verify a checkpoint (tensors on the CPU); raises :class:`CheckpointError` naming what is wrong."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({error}); resume from an earlier one "
                              "by removing it") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT_VERSION}")
    tensor_file = path / "tensors.safetensors"
    if not tensor_file.is_file() or _sha256(tensor_file) != meta.get("tensors_sha256"):
        raise CheckpointError(f"checkpoint {path} is truncated or modified (tensor checksum mismatch); "
                              "remove it to resume from the previous one")
    tensors = load_file(str(tensor_file))

    def group(prefix: str) -> dict:
        return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}

    state = ServerState(group("weights"), group("mask"), group("frozen"), meta["round"],
                        meta["freeze_version"], meta["cumulative_bytes"], meta["cumulative_flops"])
    meta["server_tensors"], meta["freeze_tensors"], meta["policy_tensors"] = \
        group("server"), group("freeze"), group("policy")
    return state, meta


class Checkpointer(Callback):
    """A checkpoint every ``every`` rounds and after the last one. Each holds the server state, the parts'
    own state, the config text and what the run's other callbacks ask to keep (:meth:`Callback.checkpoint_meta`,
    e.g. the MLflow run id), which a resumed run hands back to them."""

    def __init__(self, directory: Path, every: int, server: RoundServer, config_text: str,
                 callbacks: list[Callback] = ()):
        self.directory, self.every, self.server = Path(directory), every, server
        self.config_text, self.callbacks = config_text, list(callbacks)

    def on_round_end(self, event: RoundEvent) -> None:
        exp = self.server.experiment
        if event.round % self.every == 0 or event.round == exp.rounds:
            meta = {key: value for callback in self.callbacks for key, value in callback.checkpoint_meta().items()}
            save(self.directory, event.state, {
                **meta, "config": self.config_text, "checkpoint_every": self.every,
                "codec_state": {"uplink": exp.uplink_codec.state_dict(), "downlink": exp.downlink_codec.state_dict()},
                "server_tensors": exp.aggregator.state_dict(), "freeze_tensors": exp.freeze_policy.state_dict(),
                "policy_tensors": exp.mask_policy.state_dict()})


def read(directory: Path, config_text: str) -> tuple[ServerState, dict]:
    """Load and verify the newest checkpoint in ``directory`` (on the CPU), before any data is loaded."""
    path = latest(directory)
    state, meta = load(path)
    if meta.get("config") != config_text:
        raise CheckpointError(f"checkpoint {path} was written by a different configuration; resume with "
                              "the same algorithm, presets and flags as the interrupted run")
    return state, meta


def apply(server: RoundServer, state: ServerState, meta: dict) -> ServerState:
    """Hand the checkpointed server-side state to the server's parts; returns the state on its device."""
    exp, device = server.experiment, server.device
    exp.aggregator.load_state_dict({k: v.to(device) for k, v in meta["server_tensors"].items()})
    exp.freeze_policy.load_state_dict({k: v.to(device) for k, v in meta["freeze_tensors"].items()})
    exp.mask_policy.load_state_dict({k: v.to(device) for k, v in meta["policy_tensors"].items()})
    exp.uplink_codec.load_state_dict(meta["codec_state"]["uplink"])
    exp.downlink_codec.load_state_dict(meta["codec_state"]["downlink"])
    move = lambda tensors: {k: v.to(device) for k, v in tensors.items()}  # noqa: E731
    return dataclasses.replace(state, weights=move(state.weights), mask=move(state.mask), frozen=move(state.frozen))
