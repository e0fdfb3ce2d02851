"""Export: ONNX parity with PyTorch across chunks, chunk invariance, dynamic axes, the card, the errors."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

# The export stage needs the training extras; where they are absent (the serving image) skip, not error.
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from export import CARD_FILE, ONNX_FILE, ExportError, export_artifact  # noqa: E402
from export import module as module_export  # noqa: E402
from export.onnx_export import to_onnx  # noqa: E402
from modelcard import spec_from_card  # noqa: E402
from modelcard.card import ModelCard  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.model import STATE_NAMES, SequenceModel  # noqa: E402
from training.tasks import get_task  # noqa: E402

ATOL = 1e-5
CARD_KEYS = {
    "format_version", "name", "task", "cell", "input", "output", "state", "vocabulary", "layers", "hidden",
    "opset", "onnx_sha256", "parity", "training", "exported_at", "exporter",
}  # fmt: skip
Arrays = list[np.ndarray]  # y, then each state tensor
CheckpointFactory = Callable[..., Path]  # conftest's save_random_checkpoint


@pytest.fixture(params=["token_artifact", "feature_artifact"])
def artifact(request: pytest.FixtureRequest) -> Path:
    """Each exported fixture artifact in turn."""
    path: Path = request.getfixturevalue(request.param)
    return path


def _session(directory: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(directory / ONNX_FILE), options, providers=["CPUExecutionProvider"])


def _card(directory: Path) -> dict[str, Any]:
    card: dict[str, Any] = json.loads((directory / CARD_FILE).read_text())
    return card


def _inputs(model: SequenceModel, batch: int, time: int, seed: int) -> tuple[np.ndarray, Arrays]:
    """Random x and random state tensors (layers, batch, hidden), one per the cell's state name."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    x: np.ndarray
    if cfg.input_kind == "tokens":
        x = rng.integers(0, cfg.input_size, size=(batch, time), dtype=np.int64)
    else:
        x = rng.standard_normal((batch, time, cfg.input_size), dtype=np.float32)
    shape = (cfg.num_layers, batch, cfg.hidden_size)
    return x, [rng.standard_normal(shape, dtype=np.float32) for _ in STATE_NAMES[cfg.cell]]


def _ort(session: Any, x: np.ndarray, states: Arrays) -> Arrays:
    names = [f"{name}0" for name in ("h", "c")[: len(states)]]
    outputs = ["y", *(f"{name}n" for name in ("h", "c")[: len(states)])]
    results: Arrays = session.run(outputs, {"x": x} | dict(zip(names, states, strict=True)))
    return results


def _torch(model: SequenceModel, x: np.ndarray, states: Arrays) -> Arrays:
    with torch.no_grad():
        y, new_states = model(torch.from_numpy(x), tuple(torch.from_numpy(state) for state in states))
    return [y.numpy(), *(state.numpy() for state in new_states)]


def _assert_close(actual: Arrays, expected: Arrays) -> None:
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == b.shape, index
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL, err_msg=str(index))


def test_parity_with_torch_carrying_state_over_chunks(artifact: Path) -> None:
    model = load_checkpoint(artifact).model
    session = _session(artifact)
    x, start = _inputs(model, batch=3, time=24, seed=1)
    torch_states = ort_states = start
    for chunk in np.split(x, [5, 6, 17], axis=1):  # lengths 5, 1, 11, 7: none is the traced example's 3
        y_torch, *torch_states = _torch(model, chunk, torch_states)
        y_ort, *ort_states = _ort(session, chunk, ort_states)
        _assert_close([y_ort, *ort_states], [y_torch, *torch_states])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_run_equals_whole_run(artifact: Path, seed: int) -> None:
    model = load_checkpoint(artifact).model
    session = _session(artifact)
    x, states = _inputs(model, batch=2, time=30, seed=seed)
    cuts = sorted(np.random.default_rng(seed).choice(np.arange(1, 30), size=4, replace=False).tolist())
    whole = _ort(session, x, states)
    ys = []
    for chunk in np.split(x, cuts, axis=1):
        y, *states = _ort(session, chunk, states)
        ys.append(y)
    _assert_close([np.concatenate(ys, axis=1), *states], whole)


def test_graph_declares_named_dynamic_axes(artifact: Path) -> None:
    card = _card(artifact)
    graph = onnx.load(str(artifact / ONNX_FILE)).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }
    x_dims = (
        ["batch", "time"] if card["input"]["kind"] == "tokens" else ["batch", "time", card["input"]["size"]]
    )
    state = [card["layers"], "batch", card["hidden"]]
    assert dims == {
        "x": x_dims,
        "h0": state,
        "c0": state,
        "y": ["batch", "time", card["output"]["size"]],
        "hn": state,
        "cn": state,
    }


@pytest.mark.parametrize(("batch", "time"), [(1, 1), (1, 40), (5, 7)])
def test_runs_at_other_batch_sizes_and_lengths(artifact: Path, batch: int, time: int) -> None:
    model = load_checkpoint(artifact).model
    x, states = _inputs(model, batch, time, seed=3)
    y, *new_states = _ort(_session(artifact), x, states)
    assert y.shape == (
        batch,
        time,
        model.config.output_size,
    )  # the time axis is not frozen at the example's 3
    assert [state.shape for state in new_states] == [state.shape for state in states]
    _assert_close([y, *new_states], _torch(model, x, states))


def test_card_describes_the_artifact(artifact: Path) -> None:
    card = _card(artifact)
    checkpoint = load_checkpoint(artifact)
    assert set(card) == CARD_KEYS
    assert card["format_version"] == 2
    assert card["name"] == artifact.name
    assert (card["task"], card["cell"], card["opset"]) == (checkpoint.task.name, "lstm", 17)
    assert (card["layers"], card["hidden"]) == (checkpoint.config.num_layers, checkpoint.config.hidden_size)
    assert card["onnx_sha256"] == hashlib.sha256((artifact / ONNX_FILE).read_bytes()).hexdigest()
    assert card["output"]["labels"] == checkpoint.task.output_labels
    assert card["training"] == checkpoint.metrics
    state = [checkpoint.config.num_layers, "batch", checkpoint.config.hidden_size]
    assert card["state"] == [
        {"name": name, "input": f"{name}0", "output": f"{name}n", "shape": state, "dtype": "float32",
         "initial": "zeros"}
        for name in ("h", "c")
    ]  # fmt: skip
    assert set(card["exporter"]) == {"torch", "onnx", "onnxruntime"}


def test_what_export_writes_is_what_serving_reads(artifact: Path) -> None:
    """One contract (modelcard): the card export wrote parses as the spec serving loads, and the graph's
    tensors carry the contract's names, so neither side can drift alone."""
    card, checkpoint = _card(artifact), load_checkpoint(artifact)
    spec = spec_from_card(card)
    config = checkpoint.config
    assert (spec.input_kind, spec.input_size, spec.output_size) == (
        config.input_kind,
        config.input_size,
        config.output_size,
    )
    assert (spec.layers, spec.hidden, spec.fingerprint) == (
        card["layers"],
        card["hidden"],
        card["onnx_sha256"],
    )
    assert card["input"]["dtype"] == spec.input_dtype.name
    session = _session(artifact)
    assert [arg.name for arg in session.get_inputs()] == [spec.input_name, *(s.input for s in spec.states)]
    assert [arg.name for arg in session.get_outputs()] == [spec.output_name, *(s.output for s in spec.states)]


def test_card_records_parity_within_tolerance(artifact: Path) -> None:
    parity = _card(artifact)["parity"]
    assert parity["tolerance"] == ATOL
    assert 0 <= parity["ort_vs_torch_max_abs"] <= ATOL
    assert 0 <= parity["chunked_vs_whole_max_abs"] <= ATOL
    names = [case["name"] for case in parity["cases"]]
    assert all(case["max_abs"] <= ATOL for case in parity["cases"])
    assert any("b=1" in name for name in names) and any("b=4" in name for name in names)
    assert any(name.startswith("task") and "chunks" in name for name in names)


def test_token_card_has_vocabulary_and_feature_card_has_none(
    token_artifact: Path, feature_artifact: Path
) -> None:
    tokens, features = _card(token_artifact), _card(feature_artifact)
    vocabulary_size = len(tokens["vocabulary"])
    assert tokens["input"] == {"kind": "tokens", "size": vocabulary_size, "dtype": "int64", "name": "x"}
    assert tokens["vocabulary"] == get_task("language").info().vocabulary
    assert features["vocabulary"] is None
    assert features["input"]["kind"] == "features" and features["input"]["dtype"] == "float32"


def test_graph_carries_metadata_and_passes_checker(artifact: Path) -> None:
    model = onnx.load(str(artifact / ONNX_FILE))
    onnx.checker.check_model(model)
    props = {prop.key: prop.value for prop in model.metadata_props}
    card = _card(artifact)
    assert props["conveyor.name"] == artifact.name
    assert props["conveyor.task"] == card["task"]
    assert props["conveyor.input_kind"] == card["input"]["kind"]
    embedded = {key: value for key, value in card.items() if key not in ("onnx_sha256", "parity")}
    assert json.loads(props["conveyor.card"]) == embedded


def test_missing_directory_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no such directory"):
        export_artifact(tmp_path / "nowhere")


def test_directory_without_checkpoint_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no checkpoint\.pt"):
        export_artifact(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_is_an_export_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="corrupt"):
        export_artifact(tmp_path)
    assert not (tmp_path / ONNX_FILE).exists() and not (tmp_path / CARD_FILE).exists()


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_gru_and_rnn_checkpoints_export_with_h_alone(
    tmp_path: Path, random_checkpoint: CheckpointFactory, cell: str
) -> None:
    directory = random_checkpoint(tmp_path, "sensor", cell=cell, layers=2)
    card = export_artifact(directory)
    assert (card.cell, [tensor.name for tensor in card.state]) == (cell, ["h"])
    model = load_checkpoint(directory).model
    session = _session(directory)
    assert [arg.name for arg in session.get_inputs()] == ["x", "h0"]
    x, states = _inputs(model, batch=2, time=11, seed=4)
    _assert_close(_ort(session, x, states), _torch(model, x, states))


@pytest.mark.parametrize(("drift", "figure"), [(1e-3, r"0\.001"), (float("nan"), "nan")])
def test_parity_miss_fails_the_export_and_removes_stale_outputs(
    tmp_path: Path,
    random_checkpoint: CheckpointFactory,
    monkeypatch: pytest.MonkeyPatch,
    drift: float,
    figure: str,
) -> None:
    export_artifact(random_checkpoint(tmp_path, "language"))  # a good export first, now stale
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pt", CARD_FILE, ONNX_FILE]

    def drifted(
        model: SequenceModel, example: tuple[Any, ...], card: ModelCard, metadata: dict[str, str]
    ) -> Any:
        twin = copy.deepcopy(model)  # a graph that no longer matches the checkpoint's weights
        with torch.no_grad():
            twin.head.bias.add_(drift)
        return to_onnx(twin, example, card, metadata)

    monkeypatch.setattr(module_export, "to_onnx", drifted)
    miss = rf"parity check failed.*ort vs torch: max \|a-b\|/\(1\+\|b\|\) \S+ \(abs {figure}"
    with pytest.raises(ExportError, match=miss):
        export_artifact(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pt"]
