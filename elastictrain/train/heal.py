"""A member's training state sent to the others over the world's process group: the way a
re-formed world goes on when no step is whole in the records (a lost node whose every copy
is corrupt or gone).

Under data parallelism the model, the optimizer and the scheduler are the same on every
rank, and the data plan and the random seeds derive from the step, so the state of any member
at step S is the state at step S. The source broadcasts a manifest (versioned JSON: the
optimizer's and the scheduler's plain values, and each state tensor's dtype and shape), then
every tensor in a fixed order; the others allocate what they lack and load it. No pickle.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from elastictrain.errors import ElasticTrainError
from elastictrain.train.collectives import Collectives

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20


class HealError(ElasticTrainError):
    """The state cannot be sent this way (a value that is not plain data)."""


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise HealError(f"unknown dtype {name!r} in a state manifest")
    return dtype


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data (tuples as lists), or HealError."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise HealError(f"{where}: a {type(value).__name__} is not plain data")


def _manifest(optimizer: torch.optim.Optimizer, scheduler) -> tuple[dict, list[torch.Tensor]]:
    """The source's manifest and its optimizer state tensors, in the order they are sent."""
    state = optimizer.state_dict()
    tensors: list[torch.Tensor] = []
    entries = []
    for index in sorted(state["state"]):
        fields = {}
        for key in sorted(state["state"][index]):
            value = state["state"][index][key]
            if isinstance(value, torch.Tensor):
                fields[key] = {"tensor": str(value.dtype), "shape": list(value.shape),
                               "cpu": value.device.type == "cpu"}  # fmt: skip
                tensors.append(value)
            else:
                fields[key] = {"value": _plain(value, f"optimizer state {index}.{key}")}
        entries.append([int(index), fields])
    groups = [_plain(g, "optimizer param group") for g in state["param_groups"]]
    sched = _plain(scheduler.state_dict(), "scheduler") if scheduler is not None else None
    return {"version": MANIFEST_VERSION, "state": entries, "groups": groups,
            "scheduler": sched}, tensors  # fmt: skip


def _broadcast_bytes(coll: Collectives, data: bytes | None, source: int,
                     device: torch.device) -> bytes:  # fmt: skip
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    coll.broadcast(size, root=source)
    length = int(size.item())
    if not 0 < length <= MAX_MANIFEST_BYTES:
        raise HealError(f"a state manifest of {length} bytes")
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data is not None
              else torch.empty(length, dtype=torch.uint8, device=device))  # fmt: skip
    coll.broadcast(buffer, root=source)
    return bytes(buffer.cpu().numpy())


def _send(coll: Collectives, tensor: torch.Tensor, source: int, device: torch.device) -> None:
    """Broadcast ``tensor`` in place (through ``device`` when it lives elsewhere: NCCL)."""
    if tensor.device == device or device.type == "cpu":
        coll.broadcast(tensor, root=source)
        return
    staged = tensor.to(device)
    coll.broadcast(staged, root=source)
    tensor.copy_(staged)


def share_state(coll: Collectives, source: int, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, scheduler,
                device: torch.device) -> None:  # fmt: skip
    """Every member of ``coll`` leaves with ``source``'s model, optimizer and scheduler state.

    Collective: every member calls it. Raises HealError (on every member, once the source's
    manifest is read) when the state is not plain data."""
    mine = coll.rank == source
    manifest_bytes = None
    tensors: list[torch.Tensor] = []
    if mine:
        try:
            manifest, tensors = _manifest(optimizer, scheduler)
            manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
        except HealError as exc:  # tell the others, then fail alike
            logger.error("rank %d cannot send its state: %s", coll.rank, exc)
            manifest_bytes = json.dumps({"version": MANIFEST_VERSION, "error": str(exc)}).encode()
    manifest = json.loads(_broadcast_bytes(coll, manifest_bytes, source, device))
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise HealError("a state manifest of another version")
    if "error" in manifest:
        raise HealError(f"rank {source} cannot send its state: {manifest['error']}")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            _send(coll, tensor.data, source, device)
    if not mine:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state: dict[int, dict[str, Any]] = {}
        for index, fields in manifest["state"]:
            where = params[index].device if 0 <= index < len(params) else device
            entry: dict[str, Any] = {}
            for key, spec in fields.items():
                if "tensor" in spec:
                    target = torch.device("cpu") if spec["cpu"] else where
                    entry[key] = torch.empty(spec["shape"], dtype=_dtype(spec["tensor"]),
                                             device=target)  # fmt: skip
                    tensors.append(entry[key])
                else:
                    entry[key] = spec["value"]
            state[int(index)] = entry
    for tensor in tensors:
        _send(coll, tensor, source, device)
    if not mine:
        optimizer.load_state_dict({"state": state, "param_groups": manifest["groups"]})
        if scheduler is not None and manifest["scheduler"] is not None:
            scheduler.load_state_dict(manifest["scheduler"])
