"""Export: a training checkpoint -> `model.onnx` with explicit (h, c) state + `model.json`, verified."""

from export.artifact import export_artifact
from export.card import InputSpec, ModelCard, OutputSpec
from export.errors import ExportError
from export.onnx_export import OPSET
from export.verify import TOLERANCE, ParityCase, ParityReport
from modelcard import CARD_FILE, ONNX_FILE

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
    "export_artifact",
]
