"""The sequence model: shapes for every cell and input kind, and state carried across calls."""

from __future__ import annotations

import pytest
import torch

from training.model import STATE_NAMES, CellKind, InputKind, ModelConfig, SequenceModel

pytestmark = pytest.mark.timeout(60)

CELLS: tuple[CellKind, ...] = ("lstm", "gru", "rnn")
KINDS: tuple[InputKind, ...] = ("tokens", "features")


def _model(cell: CellKind, kind: InputKind, layers: int = 2) -> SequenceModel:
    torch.manual_seed(0)
    config = ModelConfig(
        kind, input_size=11, output_size=7, hidden_size=16, num_layers=layers, embed_size=8, cell=cell
    )
    return SequenceModel(config).eval()


def _inputs(kind: InputKind, batch: int, time: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "tokens":
        return torch.randint(0, 11, (batch, time), generator=generator)
    return torch.randn(batch, time, 11, generator=generator)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes(cell: CellKind, kind: InputKind) -> None:
    model = _model(cell, kind)
    y, state = model(_inputs(kind, batch=3, time=5), model.init_state(3))
    assert y.shape == (3, 5, 7)
    assert y.dtype == torch.float32
    assert len(state) == len(STATE_NAMES[cell]) == (2 if cell == "lstm" else 1)
    assert all(tensor.shape == (2, 3, 16) for tensor in state)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind", KINDS)
def test_state_carried_between_calls_equals_one_call(cell: CellKind, kind: InputKind) -> None:
    model = _model(cell, kind)
    x = _inputs(kind, batch=2, time=9)
    with torch.no_grad():
        whole, state_whole = model(x, model.init_state(2))
        first, state = model(x[:, :4], model.init_state(2))
        second, state_end = model(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-6, rtol=0)
    for end, expected in zip(state_end, state_whole, strict=True):
        torch.testing.assert_close(end, expected, atol=1e-6, rtol=0)


def test_state_changes_the_output() -> None:
    model = _model("lstm", "tokens")
    x = _inputs("tokens", batch=1, time=3)
    zeros = model.init_state(1)
    other = (torch.ones_like(zeros[0]), torch.ones_like(zeros[1]))
    with torch.no_grad():
        assert not torch.allclose(model(x, zeros)[0], model(x, other)[0])


def test_init_state_is_zeros() -> None:
    h, c = _model("lstm", "tokens").init_state(4)
    assert h.shape == (2, 4, 16)
    assert not h.any() and not c.any()


@pytest.mark.parametrize(
    ("field", "value"), [("cell", "transformer"), ("input_kind", "images"), ("hidden_size", 0)]
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"input_kind": "tokens", "input_size": 3, "output_size": 3, field: value}
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)  # type: ignore[arg-type]
