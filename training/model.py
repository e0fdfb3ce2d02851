"""The sequence model: input encoder -> recurrent cell -> linear head, with the state passed explicitly.

The recurrent state is an argument and a return value, never a module attribute, so the same `forward`
serves training (state starts at zeros), chunked streaming (state carried between calls) and ONNX export
(state becomes the graph inputs `h0`, `c0` and outputs `hn`, `cn`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

CellKind = Literal["lstm", "gru", "rnn"]
InputKind = Literal["tokens", "features"]

CELL_KINDS: tuple[CellKind, ...] = ("lstm", "gru", "rnn")
INPUT_KINDS: tuple[InputKind, ...] = ("tokens", "features")

# (h, c), each (layers, B, H). GRU and plain RNN have no cell state: their c is carried through unchanged so
# every model has the same signature, and the export and serving stages never special-case the cell.
State = tuple[torch.Tensor, torch.Tensor]


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

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        if self.cell not in CELL_KINDS:
            raise ValueError(f"cell must be one of {CELL_KINDS}, got {self.cell!r}")
        for name in ("input_size", "output_size", "hidden_size", "num_layers", "embed_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


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

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder: nn.Embedding | nn.Linear
        if config.input_kind == "tokens":
            self.encoder = nn.Embedding(config.input_size, config.embed_size)
        else:
            self.encoder = nn.Linear(config.input_size, config.embed_size)
        self.rnn = _make_cell(config)
        self.head = nn.Linear(config.hidden_size, config.output_size)

    def init_state(self, batch: int) -> State:
        """Zero state for `batch` independent sequences: (h, c), each (layers, batch, hidden)."""
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return torch.zeros(shape), torch.zeros(shape)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Run `x` from `state`; returns raw logits (B, T, output_size) and the state after the last step."""
        h, c = state  # h, c: (layers, B, H)
        e = self.encoder(x)  # (B, T, E)
        if isinstance(self.rnn, nn.LSTM):
            z, (hn, cn) = self.rnn(e, (h, c))  # z: (B, T, H)
        else:
            z, hn = self.rnn(e, h)  # z: (B, T, H)
            cn = c  # no cell state: carried unchanged (see `State`)
        y = self.head(z)  # (B, T, output_size)
        return y, (hn, cn)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
