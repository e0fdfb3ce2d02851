"""`export_module`: any recurrent PyTorch module whose `forward(x, state) -> (y, state)` takes a tuple of
state tensors -> a verified `model.onnx` and its card, which `conveyor serve` serves like one of ours.

`conveyor export` of a checkpoint comes through here too (`export.artifact`): one path, one verification.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.card import OPSET, exporter_versions, input_spec
from export.errors import ExportError
from export.onnx_export import to_onnx
from export.verify import TOLERANCE, verify_parity
from modelcard import CARD_FILE, ONNX_FILE, spec_from_card
from modelcard.card import ModelCard, OutputSpec, StateTensor, timestamp, write_artifact

# The traced example's sizes. Neither is 1, so the tracer cannot mistake a broadcastable 1 for a fixed size;
# verification then runs other batch sizes and lengths to prove both axes really are dynamic.
_EXAMPLE_BATCH = 2
_EXAMPLE_TIME = 3
DEFAULT_STATE_NAMES = {1: ("h",), 2: ("h", "c")}


def export_module(
    module: nn.Module,
    example_input: torch.Tensor,
    example_state: Sequence[torch.Tensor],
    out_dir: Path | str,
    *,
    state_names: Sequence[str] | None = None,
    batch_axis: int = 1,
    vocabulary_size: int | None = None,
    name: str | None = None,
    task: str = "custom",
    output_meaning: str = "model outputs",
    output_labels: Sequence[str] = (),
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> ModelCard:
    """Export `module` to `out_dir`/model.onnx and model.json, verified; returns the card.

    `example_input`: a batch of real sequences, int64 token ids [batch, time] (give `vocabulary_size`) or
    float32 features [batch, time, features]; the verification runs them besides random ones.
    `example_state`: the state tensors for that batch, as `forward` takes them, each with its batch axis at
    `batch_axis` (1 for PyTorch's RNNs: [layers, batch, hidden]); zeros must be the state a sequence starts
    from. Names: `state_names`, else h (and c) for one (two) tensors, else s0, s1, ...
    Raises `ExportError` when the module is bidirectional, the export fails, or ONNX Runtime misses PyTorch or
    chunked runs miss whole runs by more than `tolerance` (the model cannot be streamed).
    """
    _refuse_bidirectional(module)
    out_dir = Path(out_dir)
    card = _describe(
        module, example_input, example_state, out_dir, state_names, batch_axis, vocabulary_size, name, task,
        output_meaning, tuple(output_labels),
    )  # fmt: skip
    samples = list(example_input.numpy())
    return export_verified(module.eval(), card, out_dir, samples, tolerance, seed)


def export_verified(
    module: nn.Module, card: ModelCard, out_dir: Path, samples: list[np.ndarray], tolerance: float, seed: int
) -> ModelCard:
    """Trace `module` as `card` describes it, verify it on random inputs and `samples`, and write both files.

    On a failure, any `model.onnx` and `model.json` already in `out_dir` are removed: they would describe a
    different model."""
    try:
        return _export(module, card, out_dir, samples, tolerance, seed)
    except ExportError as exc:
        for file_name in (CARD_FILE, ONNX_FILE):
            (out_dir / file_name).unlink(missing_ok=True)
        raise ExportError(f"cannot export {out_dir}: {exc}") from exc


def _export(
    module: nn.Module, card: ModelCard, out_dir: Path, samples: list[np.ndarray], tolerance: float, seed: int
) -> ModelCard:
    metadata = {
        "conveyor.name": card.name,
        "conveyor.task": card.task,
        "conveyor.input_kind": card.input.kind,
        "conveyor.card": card.embedded_json(),
    }
    onnx_bytes = to_onnx(module, _example(card), card, metadata).SerializeToString()
    fingerprint = hashlib.sha256(onnx_bytes).hexdigest()
    spec = spec_from_card(replace(card, onnx_sha256=fingerprint).to_dict())
    parity = verify_parity(module, onnx_bytes, spec, samples, tolerance, seed)
    card = replace(card, onnx_sha256=fingerprint, parity=parity)
    try:
        write_artifact(out_dir, onnx_bytes, card)
    except OSError as exc:
        raise ExportError(f"cannot write to {out_dir}: {exc}") from exc
    return card


def _example(card: ModelCard) -> tuple[torch.Tensor, ...]:
    """Zeros of the traced sizes: x, then each state tensor."""
    if card.input.kind == "tokens":
        x = torch.zeros((_EXAMPLE_BATCH, _EXAMPLE_TIME), dtype=torch.int64)
    else:
        x = torch.zeros((_EXAMPLE_BATCH, _EXAMPLE_TIME, card.input.size), dtype=torch.float32)
    states = (
        torch.zeros([_EXAMPLE_BATCH if size is None else size for size in tensor.shape])
        for tensor in card.state
    )
    return (x, *states)


def _refuse_bidirectional(module: nn.Module) -> None:
    for part_name, part in module.named_modules():
        if isinstance(part, nn.RNNBase) and part.bidirectional:
            raise ExportError(
                f"{part_name or type(module).__name__} is bidirectional: it reads every sequence backwards "
                "from its end, which a stream has not reached yet, so it cannot be streamed"
            )


def _describe(
    module: nn.Module,
    x: torch.Tensor,
    state: Sequence[torch.Tensor],
    out_dir: Path,
    state_names: Sequence[str] | None,
    batch_axis: int,
    vocabulary_size: int | None,
    name: str | None,
    task: str,
    output_meaning: str,
    output_labels: tuple[str, ...],
) -> ModelCard:
    kind, input_size = _input_kind(x, vocabulary_size)
    with torch.no_grad():
        y, _ = module.eval()(x, tuple(state))
    if y.ndim != 3 or tuple(y.shape[:2]) != tuple(x.shape[:2]):
        raise ExportError(f"forward must return y [batch, time, outputs]; it returned {list(y.shape)}")
    if output_labels and len(output_labels) != y.shape[2]:
        raise ExportError(f"{len(output_labels)} output labels for {y.shape[2]} outputs")
    return ModelCard(
        name=name or out_dir.resolve().name,
        task=task,
        cell=type(module).__name__,
        input=input_spec(kind, input_size),
        output=OutputSpec(int(y.shape[2]), output_meaning, output_labels),
        state=_states(state, state_names, batch_axis, x.shape[0]),
        vocabulary=None,
        layers=None,
        hidden=None,
        opset=OPSET,
        exported_at=timestamp(),
        exporter=exporter_versions(),
    )


def _input_kind(x: torch.Tensor, vocabulary_size: int | None) -> tuple[str, int]:
    if x.dtype == torch.int64 and x.ndim == 2:
        if vocabulary_size is None:
            raise ExportError("token inputs (int64 [batch, time]) need vocabulary_size")
        return "tokens", vocabulary_size
    if x.dtype == torch.float32 and x.ndim == 3:
        return "features", int(x.shape[2])
    raise ExportError(
        f"example_input must be int64 [batch, time] or float32 [batch, time, features], not {x.dtype} "
        f"{list(x.shape)}"
    )


def _states(
    state: Sequence[torch.Tensor], names: Sequence[str] | None, batch_axis: int, batch: int
) -> tuple[StateTensor, ...]:
    fallback = tuple(f"s{i}" for i in range(len(state)))
    chosen = tuple(names or DEFAULT_STATE_NAMES.get(len(state), fallback))
    if len(chosen) != len(state):
        raise ExportError(f"{len(chosen)} state names for {len(state)} state tensors")
    tensors = []
    for tensor_name, tensor in zip(chosen, state, strict=True):
        if tensor.ndim <= batch_axis or tensor.shape[batch_axis] != batch:
            raise ExportError(
                f"state {tensor_name!r} is {list(tensor.shape)}: its axis {batch_axis} should be the batch "
                f"({batch})"
            )
        shape = tuple(None if axis == batch_axis else size for axis, size in enumerate(tensor.shape))
        try:
            tensors.append(StateTensor(tensor_name, f"{tensor_name}0", f"{tensor_name}n", shape))
        except ValueError as exc:
            raise ExportError(str(exc)) from exc
    return tuple(tensors)
