"""A PyTorch module whose `forward(x, state) -> (y, state)` takes a tuple of state tensors -> an ONNX graph
with each state tensor an explicit input and output, named as the card says (`modelcard.card`)."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from export.card import OPSET
from export.errors import ExportError
from modelcard.card import ModelCard


class _StateAsTensors(nn.Module):
    """Flattens the state tuple so that each tensor becomes its own named graph input and output."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, new_state = self.module(x, tuple(state))
        return (y, *new_state)


def _dynamic_axes(card: ModelCard) -> dict[str, dict[int, str]]:
    sequence = {0: "batch", 1: "time"}  # x, y: (batch, time, ...)
    axes = {card.input.name: sequence, card.output.name: sequence}
    for tensor in card.state:
        axes[tensor.input] = axes[tensor.output] = {tensor.batch_axis: "batch"}
    return axes


def _trace(module: nn.Module, example: tuple[torch.Tensor, ...], card: ModelCard) -> bytes:
    with tempfile.TemporaryDirectory() as temp, warnings.catch_warnings():
        # Expected noise, each covered by verification: the legacy exporter is deliberate (the dynamo one
        # froze y's time axis to the example's length); nn.LSTM's shape checks trace as constants; and the
        # LSTM batch-size warning asks for h0/c0 as graph inputs, which they are.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        path = Path(temp) / "model.onnx"
        torch.onnx.export(
            _StateAsTensors(module).eval(),
            example,
            path,
            input_names=[card.input.name, *(tensor.input for tensor in card.state)],
            output_names=[card.output.name, *(tensor.output for tensor in card.state)],
            dynamic_axes=_dynamic_axes(card),
            opset_version=OPSET,
            dynamo=False,
        )
        return path.read_bytes()


def to_onnx(
    module: nn.Module, example: tuple[torch.Tensor, ...], card: ModelCard, metadata: Mapping[str, str]
) -> onnx.ModelProto:
    """Trace `module` on `example` (x, *state) into a checked ONNX graph (opset 17, dynamic batch and time)
    carrying `metadata` as props. The example's batch and time must not be 1: the tracer could take a
    broadcastable 1 for a fixed size (verification then runs other sizes to prove both axes dynamic)."""
    try:
        proto = onnx.load_from_string(_trace(module, example, card))
    except Exception as exc:  # the tracer raises anything from RuntimeError to AssertionError
        raise ExportError(f"torch.onnx.export failed: {exc}") from exc
    for key, value in metadata.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {exc}") from exc
    return proto
