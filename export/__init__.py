"""Export: a training checkpoint, or any recurrent PyTorch module of the user's own -> `model.onnx` with its
state as explicit inputs and outputs, and `model.json`, verified."""

from export.artifact import export_artifact
from export.card import OPSET
from export.errors import ExportError
from export.module import export_module
from export.verify import TOLERANCE
from modelcard import CARD_FILE, ONNX_FILE
from modelcard.card import InputSpec, ModelCard, OutputSpec, ParityCase, ParityReport, StateTensor

__all__ = [
    "CARD_FILE",
    "ONNX_FILE",
    "OPSET",
    "TOLERANCE",
    "ExportError",
    "InputSpec",
    "ModelCard",
    "OutputSpec",
    "ParityCase",
    "ParityReport",
    "StateTensor",
    "export_artifact",
    "export_module",
]
