"""PyTorch `SequenceModel` -> ONNX graph with the recurrent state as explicit inputs and outputs.

The graph's signature is the artifact contract's (`modelcard`): inputs x, h0, c0; outputs y, hn, cn.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from export.errors import ExportError
from modelcard import INPUT_NAMES, OUTPUT_NAMES
from training.model import SequenceModel

OPSET = 17

# The traced example's sizes. Neither is 1, so the tracer cannot mistake a broadcastable 1 for a fixed size;
# verification then runs other batch sizes and lengths to prove both axes really are dynamic.
_EXAMPLE_BATCH = 2
_EXAMPLE_TIME = 3


class _StateAsTensors(nn.Module):
    """Flattens the `(h, c)` tuple so that each half becomes its own named graph input and output."""

    def __init__(self, model: SequenceModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, (hn, cn) = self.model(x, (h0, c0))
        return y, hn, cn


def _dynamic_axes() -> dict[str, dict[int, str]]:
    sequence = {0: "batch", 1: "time"}  # x, y: (batch, time, ...)
    state = {1: "batch"}  # h, c: (layers, batch, hidden)
    (x, *state_inputs), (y, *state_outputs) = INPUT_NAMES, OUTPUT_NAMES
    return {x: sequence, y: sequence} | {name: state for name in (*state_inputs, *state_outputs)}


def _example_inputs(model: SequenceModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = model.config
    if config.input_kind == "tokens":
        x = torch.zeros((_EXAMPLE_BATCH, _EXAMPLE_TIME), dtype=torch.int64)
    else:
        x = torch.zeros((_EXAMPLE_BATCH, _EXAMPLE_TIME, config.input_size), dtype=torch.float32)
    h0, c0 = model.init_state(_EXAMPLE_BATCH)
    return x, h0, c0


def _trace(model: SequenceModel) -> bytes:
    with tempfile.TemporaryDirectory() as temp, warnings.catch_warnings():
        # Expected noise, each covered by verification: the legacy exporter is deliberate (the dynamo one
        # froze y's time axis to the example's length); nn.LSTM's shape checks trace as constants; and the
        # LSTM batch-size warning asks for h0/c0 as graph inputs, which they are.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        path = Path(temp) / "model.onnx"
        torch.onnx.export(
            _StateAsTensors(model).eval(),
            _example_inputs(model),
            path,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=_dynamic_axes(),
            opset_version=OPSET,
            dynamo=False,
        )
        return path.read_bytes()


def to_onnx(model: SequenceModel, metadata: Mapping[str, str]) -> onnx.ModelProto:
    """Trace `model` into a checked ONNX graph (opset 17, dynamic batch/time) carrying `metadata` as props."""
    try:
        proto = onnx.load_from_string(_trace(model))
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
