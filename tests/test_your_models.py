"""Models that are not ours, served: an `nn.LSTM` exported with plain `torch.onnx.export` and given a card
by `conveyor card`, and a module of the user's own exported with `export_module`. Each is streamed through a
real server in random chunks over many sessions and must equal PyTorch's whole-sequence run. And the
refusals: state that does not pair up, a bidirectional model, a graph that does not match its card."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from serving_harness import RawStream, chunk, connect, outputs, random_cuts, running

from modelcard.adopt import AdoptError, Described, Naming, adopt
from serving.cli.main import main
from serving.domain.errors import ModelLoadError
from serving.server.app import build_server
from serving.server.config import ServerConfig

torch = pytest.importorskip("torch")
from torch import Tensor, nn  # noqa: E402

from export import ExportError, export_module  # noqa: E402

pytestmark = pytest.mark.timeout(120)
FEATURES, HIDDEN, LAYERS, OUTPUTS = 5, 24, 2, 3


class Tagger(nn.Module):
    """A user's LSTM tagger with the signature plain ONNX export wants: (x, h0, c0) -> (y, hn, cn)."""

    def __init__(self, bidirectional: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lstm = nn.LSTM(FEATURES, HIDDEN, LAYERS, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), OUTPUTS)

    def forward(self, x: Any, h0: Any, c0: Any) -> tuple[Any, Any, Any]:
        z, (hn, cn) = self.lstm(x, (h0, c0))
        return self.head(z), hn, cn


def _export_plainly(
    model: Tagger, path: Path, names: tuple[str, ...] = ("x", "h0", "c0", "y", "hn", "cn")
) -> None:
    """What a user does without Conveyor: torch.onnx.export with a dynamic batch and time."""
    directions = 2 if model.lstm.bidirectional else 1
    x = torch.zeros(2, 3, FEATURES)
    state = torch.zeros(LAYERS * directions, 2, HIDDEN)
    x_name, h_in, c_in, y_name, h_out, c_out = names
    sequence, batch = {0: "batch", 1: "time"}, {1: "batch"}
    torch.onnx.export(
        model.eval(), (x, state, state), path, input_names=[x_name, h_in, c_in],
        output_names=[y_name, h_out, c_out], opset_version=17, dynamo=False,
        dynamic_axes={x_name: sequence, y_name: sequence} | dict.fromkeys((h_in, c_in, h_out, c_out), batch),
    )  # fmt: skip


def _torch_whole(model: Any, x: np.ndarray, state: tuple[Any, ...]) -> np.ndarray:
    with torch.no_grad():
        y = model(torch.from_numpy(x[None]), *state)[0]
    return np.asarray(y[0].numpy())


def _stream_in_random_chunks(
    artifact: Path, sequences: dict[str, np.ndarray], seed: int
) -> dict[str, np.ndarray]:
    """Every sequence through one server, cut at random, interleaved on one Stream; outputs per session."""
    rng = np.random.default_rng(seed)
    pending = {sid: random_cuts(len(x), rng) for sid, x in sequences.items()}
    got: dict[str, list[np.ndarray]] = {sid: [] for sid in sequences}
    with running(artifact, max_batch_size=16) as server, connect(server) as stub:
        stream = RawStream(stub)
        while any(pending.values()):
            for sid, cuts in pending.items():
                if cuts:
                    a, b = cuts.pop(0)
                    response = stream.call(chunk(sid, sequences[sid][a:b], a, start=a == 0))
                    assert response.WhichOneof("kind") == "chunk", response
                    got[sid].append(outputs(response.chunk))
        stream.close()
    return {sid: np.concatenate(parts) for sid, parts in got.items()}


def _assert_equal_within_float(streamed: np.ndarray, whole: np.ndarray) -> None:
    """<= 1e-5 absolute below magnitude 1, relative above it."""
    assert streamed.shape == whole.shape
    assert float(np.max(np.abs(streamed - whole) / (1 + np.abs(whole)))) <= 1e-5


def test_an_lstm_exported_with_plain_torch_onnx_export_is_served_after_conveyor_card(tmp_path: Path) -> None:
    model = Tagger()
    onnx_path = tmp_path / "tagger.onnx"
    _export_plainly(model, onnx_path)
    artifact = tmp_path / "tagger"
    assert main(["card", str(onnx_path), "--out", str(artifact), "--labels", "a,b,c"]) == 0
    card = json.loads((artifact / "model.json").read_text())
    assert [(s["name"], s["input"], s["output"], s["shape"]) for s in card["state"]] == [
        ("h", "h0", "hn", [LAYERS, "batch", HIDDEN]),
        ("c", "c0", "cn", [LAYERS, "batch", HIDDEN]),
    ]  # paired by name, the batch axis found
    assert card["input"] == {"kind": "features", "size": FEATURES, "dtype": "float32", "name": "x"}
    assert card["output"]["labels"] == ["a", "b", "c"]
    assert card["parity"]["chunked_vs_whole_max_abs"] <= 1e-5

    rng = np.random.default_rng(0)
    sequences = {
        f"s{i}": rng.standard_normal((int(rng.integers(5, 40)), FEATURES), np.float32) for i in range(8)
    }
    streamed = _stream_in_random_chunks(artifact, sequences, seed=1)
    zeros = torch.zeros(LAYERS, 1, HIDDEN)
    for sid, x in sequences.items():
        _assert_equal_within_float(streamed[sid], _torch_whole(model, x, (zeros, zeros)))


class Hybrid(nn.Module):
    """A module of the user's own: token embedding -> GRU -> LSTM -> head, its state three tensors (the GRU's
    h, the LSTM's h and c), forward(x, state) -> (y, state)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Embedding(30, 8)
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.lstm = nn.LSTM(16, 12, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        g, h, c = state
        z, g = self.gru(self.embed(x), g)
        z, (h, c) = self.lstm(z, (h, c))
        return self.head(z), (g, h, c)


def test_a_module_of_the_users_own_is_exported_verified_and_served(tmp_path: Path) -> None:
    model = Hybrid()
    example = torch.randint(0, 30, (3, 12))
    state = (torch.zeros(1, 3, 16), torch.zeros(1, 3, 12), torch.zeros(1, 3, 12))
    card = export_module(
        model, example, state, tmp_path / "hybrid", state_names=("g", "h", "c"), vocabulary_size=30
    )
    assert [(s.name, s.shape) for s in card.state] == [
        ("g", (1, None, 16)),
        ("h", (1, None, 12)),
        ("c", (1, None, 12)),
    ]
    assert card.parity is not None and card.parity.ort_vs_torch_max_scaled is not None
    assert card.parity.ort_vs_torch_max_scaled <= 1e-5

    rng = np.random.default_rng(2)
    sequences = {f"t{i}": rng.integers(0, 30, int(rng.integers(3, 30))) for i in range(6)}
    streamed = _stream_in_random_chunks(tmp_path / "hybrid", sequences, seed=3)
    zeros = (torch.zeros(1, 1, 16), torch.zeros(1, 1, 12), torch.zeros(1, 1, 12))
    for sid, x in sequences.items():
        with torch.no_grad():
            whole = model(torch.from_numpy(x[None]), zeros)[0][0].numpy()
        _assert_equal_within_float(streamed[sid], whole)


class LoopOverTime(nn.Module):
    """A Python loop over time: traced, it unrolls to the example's length."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(FEATURES, 8)

    def forward(self, x: Tensor, state: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        (h,) = state
        outs = []
        for step in x.unbind(1):
            h = self.cell(step, h)
            outs.append(h)
        return torch.stack(outs, dim=1), (h,)


def test_a_module_whose_graph_freezes_the_time_axis_is_refused_saying_why(tmp_path: Path) -> None:
    with pytest.raises(
        ExportError, match=r"does not run on random b=1 \(x \[1, 17, 5\]\).*Python loop over time"
    ):
        export_module(
            LoopOverTime(), torch.zeros(2, 4, FEATURES), (torch.zeros(2, 8),), tmp_path / "loop", batch_axis=0
        )
    assert not (tmp_path / "loop" / "model.json").exists()


def test_a_bidirectional_model_is_refused_at_export_at_card_and_at_load(tmp_path: Path) -> None:
    model = Tagger(bidirectional=True)
    state = torch.zeros(2 * LAYERS, 2, HIDDEN)
    module_api = _PlainSignature(model)
    with pytest.raises(ExportError, match=r"bidirectional.*cannot be streamed"):
        export_module(module_api, torch.zeros(2, 5, FEATURES), (state, state), tmp_path / "bi")
    onnx_path = tmp_path / "bi.onnx"
    _export_plainly(model, onnx_path)
    with pytest.raises(AdoptError, match="cannot be streamed"):
        adopt(onnx_path, tmp_path / "bi", Naming(), Described("bi"))
    assert not (tmp_path / "bi" / "model.json").exists()
    # A card written by hand does not get it served: the server checks at load too.
    forward = tmp_path / "forward"
    _export_plainly(Tagger(), tmp_path / "fw.onnx")
    adopt(tmp_path / "fw.onnx", forward, Naming(), Described("fw"))
    shutil.copy(onnx_path, forward / "model.onnx")
    _rewrite_card(forward, [2 * LAYERS, "batch", HIDDEN])  # the bidirectional graph's state, described
    with pytest.raises(
        ModelLoadError, match="cannot be served: its outputs depend on how the sequence is cut"
    ):
        _build(forward)


def test_state_that_does_not_pair_up_is_refused_naming_the_graphs_names(tmp_path: Path) -> None:
    onnx_path = tmp_path / "odd.onnx"
    _export_plainly(Tagger(), onnx_path, ("x", "hidden_a", "cell_a", "y", "hidden_b", "cell_b"))
    with pytest.raises(AdoptError, match=r"no state input pairs with an output by name .*--state h0:hn"):
        adopt(onnx_path, tmp_path / "odd", Naming(), Described("odd"))
    with pytest.raises(AdoptError, match=r"state hidden_a:cell_a is not an input:output pair"):
        adopt(onnx_path, tmp_path / "odd", Naming(states=(("hidden_a", "cell_a"),)), Described("odd"))
    pairs = (("hidden_a", "hidden_b"), ("cell_a", "cell_b"))
    card = adopt(onnx_path, tmp_path / "odd", Naming(states=pairs), Described("odd"))
    assert [tensor.output for tensor in card.state] == ["hidden_b", "cell_b"]


def test_a_graph_whose_shapes_are_not_its_cards_is_refused_at_load(tmp_path: Path) -> None:
    onnx_path = tmp_path / "tagger.onnx"
    _export_plainly(Tagger(), onnx_path)
    artifact = tmp_path / "tagger"
    adopt(onnx_path, artifact, Naming(), Described("tagger"))
    _rewrite_card(artifact, [LAYERS, "batch", HIDDEN + 1])
    with pytest.raises(
        ModelLoadError, match=r"input 'h0' is tensor\(float\) \[2, 'batch', 24\], but the card"
    ):
        _build(artifact)


class _PlainSignature(nn.Module):
    """(x, (h, c)) -> (y, (h, c)) over a module with the plain (x, h0, c0) signature."""

    def __init__(self, model: Tagger) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any, state: tuple[Any, Any]) -> tuple[Any, tuple[Any, Any]]:
        y, hn, cn = self.model(x, *state)
        return y, (hn, cn)


def _rewrite_card(artifact: Path, state_shape: list[int | str]) -> None:
    """The card with every state's shape set to `state_shape`, and the fingerprint of the model.onnx there."""
    path = artifact / "model.json"
    card = json.loads(path.read_text())
    for tensor in card["state"]:
        tensor["shape"] = state_shape
    card["onnx_sha256"] = hashlib.sha256((artifact / "model.onnx").read_bytes()).hexdigest()
    path.write_text(json.dumps(card))


def _build(artifact: Path) -> None:
    build_server(ServerConfig(model_dir=artifact, port=0, metrics_port=0), CollectorRegistry()).stop()
