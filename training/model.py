"""The sequence model: input encoder -> recurrent cell -> linear head, with the state passed explicitly.

The recurrent state is an argument and a return value, never a module attribute, so the same `forward`
serves training (state starts at zeros), chunked streaming (state carried between calls) and ONNX export
(each state tensor becomes a graph input, `h0` and for an LSTM `c0`, and an output, `hn` and `cn`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from training.data import Objective

CellKind = Literal["lstm", "gru", "rnn"]
InputKind = Literal["tokens", "features"]

CELL_KINDS: tuple[CellKind, ...] = ("lstm", "gru", "rnn")
INPUT_KINDS: tuple[InputKind, ...] = ("tokens", "features")
OBJECTIVES: tuple[Objective, ...] = ("classification", "regression")

# The cell's state tensors, each (layers, B, H): (h, c) for an LSTM, (h,) for a GRU or a plain RNN, which
# have no cell state. Export and serving take any such tuple, named in the model card.
State = tuple[torch.Tensor, ...]
STATE_NAMES: dict[CellKind, tuple[str, ...]] = {"lstm": ("h", "c"), "gru": ("h",), "rnn": ("h",)}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a `SequenceModel`; stored in the checkpoint as a plain dict."""

    input_kind: InputKind  # "tokens": x is int64 [B, T]; "features": x is float32 [B, T, input_size]
    input_size: int  # vocabulary size (tokens) or number of feature channels (features)
    output_size: int  # logits per step
    hidden_size: int = 128
    num_layers: int = 1
    embed_size: int = 64  # token embedding / feature projection width
    cell: CellKind = "lstm"
    # "classification": the head's outputs are logits (cross-entropy); "regression": values (squared error).
    objective: Objective = "classification"
    # Features: (x - input_mean) / input_scale before the projection, per channel, with the statistics of the
    # training split. Part of the model, so the exported graph applies it and a client sends raw readings.
    input_mean: tuple[float, ...] | None = None
    input_scale: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        if self.cell not in CELL_KINDS:
            raise ValueError(f"cell must be one of {CELL_KINDS}, got {self.cell!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        self._check_normalization()
        for name in ("input_size", "output_size", "hidden_size", "num_layers", "embed_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _check_normalization(self) -> None:
        given = (self.input_mean is not None, self.input_scale is not None)
        if given == (False, False):
            return
        if given != (True, True) or self.input_kind != "features":
            raise ValueError("input_mean and input_scale go together, and with feature inputs only")
        assert self.input_mean is not None and self.input_scale is not None
        if not len(self.input_mean) == len(self.input_scale) == self.input_size:
            raise ValueError(f"input_mean and input_scale need {self.input_size} values each")
        if min(self.input_scale) <= 0:
            raise ValueError("input_scale must be > 0 in every channel")


def _make_cell(config: ModelConfig) -> nn.LSTM | nn.GRU | nn.RNN:
    kwargs = {
        "input_size": config.embed_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "batch_first": True,
    }
    if config.cell == "lstm":
        return nn.LSTM(**kwargs)
    if config.cell == "gru":
        return nn.GRU(**kwargs)
    return nn.RNN(nonlinearity="tanh", **kwargs)


class SequenceModel(nn.Module):
    """Embedding (tokens) or linear projection (features) -> LSTM/GRU/RNN -> linear head of raw logits."""

    input_mean: torch.Tensor  # buffers, when the config normalizes its inputs
    input_scale: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder: nn.Embedding | nn.Linear
        if config.input_kind == "tokens":
            self.encoder = nn.Embedding(config.input_size, config.embed_size)
        else:
            self.encoder = nn.Linear(config.input_size, config.embed_size)
        self.normalize = config.input_mean is not None
        if self.normalize:  # buffers: saved with the weights, constants in the exported graph
            self.register_buffer("input_mean", torch.tensor(config.input_mean, dtype=torch.float32))
            self.register_buffer("input_scale", torch.tensor(config.input_scale, dtype=torch.float32))
        self.rnn = _make_cell(config)
        self.head = nn.Linear(config.hidden_size, config.output_size)

    def init_state(self, batch: int) -> State:
        """Zero state for `batch` independent sequences: one (layers, batch, hidden) tensor per state name."""
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return tuple(torch.zeros(shape) for _ in STATE_NAMES[self.config.cell])

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Run `x` from `state`; returns raw logits (B, T, output_size) and the state after the last step."""
        if self.normalize:
            x = (x - self.input_mean) / self.input_scale
        e = self.encoder(x)  # (B, T, E)
        if isinstance(self.rnn, nn.LSTM):
            h, c = state  # (layers, B, H) each
            z, (hn, cn) = self.rnn(e, (h, c))  # z: (B, T, H)
            new_state: State = (hn, cn)
        else:
            (h,) = state
            z, hn = self.rnn(e, h)  # z: (B, T, H)
            new_state = (hn,)
        y = self.head(z)  # (B, T, output_size)
        return y, new_state


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
