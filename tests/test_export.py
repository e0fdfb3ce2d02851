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
from export import artifact as artifact_module  # noqa: E402
from export.onnx_export import to_onnx  # noqa: E402
from modelcard import INPUT_NAMES, OUTPUT_NAMES, spec_from_card  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.model import SequenceModel  # noqa: E402
from training.tasks import get_task  # noqa: E402

ATOL = 1e-5
CARD_KEYS = {
    "format_version", "name", "task", "cell", "input", "output", "vocabulary", "layers", "hidden", "opset",
    "onnx_sha256", "parity", "training", "exported_at", "exporter",
}  # fmt: skip
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # y, h, c
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


def _inputs(model: SequenceModel, batch: int, time: int, seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    cfg = model.config
    x: np.ndarray
    if cfg.input_kind == "tokens":
        x = rng.integers(0, cfg.input_size, size=(batch, time), dtype=np.int64)
    else:
        x = rng.standard_normal((batch, time, cfg.input_size), dtype=np.float32)
    h, c = (rng.standard_normal((cfg.num_layers, batch, cfg.hidden_size), dtype=np.float32) for _ in "hc")
    return x, h, c


def _ort(session: Any, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> Arrays:
    y, hn, cn = session.run(["y", "hn", "cn"], {"x": x, "h0": h, "c0": c})
    return y, hn, cn


def _torch(model: SequenceModel, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> Arrays:
    with torch.no_grad():
        y, (hn, cn) = model(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c)))
    return y.numpy(), hn.numpy(), cn.numpy()


def _assert_close(actual: Arrays, expected: Arrays) -> None:
    for name, a, b in zip(("y", "hn", "cn"), actual, expected, strict=True):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL, err_msg=name)


def test_parity_with_torch_carrying_state_over_chunks(artifact: Path) -> None:
    model = load_checkpoint(artifact).model
    session = _session(artifact)
    x, h0, c0 = _inputs(model, batch=3, time=24, seed=1)
    h_torch, c_torch = h_ort, c_ort = h0, c0
    for chunk in np.split(x, [5, 6, 17], axis=1):  # lengths 5, 1, 11, 7: none is the traced example's 3
        y_torch, h_torch, c_torch = _torch(model, chunk, h_torch, c_torch)
        y_ort, h_ort, c_ort = _ort(session, chunk, h_ort, c_ort)
        _assert_close((y_ort, h_ort, c_ort), (y_torch, h_torch, c_torch))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_run_equals_whole_run(artifact: Path, seed: int) -> None:
    model = load_checkpoint(artifact).model
    session = _session(artifact)
    x, h, c = _inputs(model, batch=2, time=30, seed=seed)
    cuts = sorted(np.random.default_rng(seed).choice(np.arange(1, 30), size=4, replace=False).tolist())
    whole = _ort(session, x, h, c)
    ys = []
    for chunk in np.split(x, cuts, axis=1):
        y, h, c = _ort(session, chunk, h, c)
        ys.append(y)
    _assert_close((np.concatenate(ys, axis=1), h, c), whole)


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
    x, h, c = _inputs(model, batch, time, seed=3)
    y, hn, cn = _ort(_session(artifact), x, h, c)
    assert y.shape == (
        batch,
        time,
        model.config.output_size,
    )  # the time axis is not frozen at the example's 3
    assert hn.shape == cn.shape == h.shape
    _assert_close((y, hn, cn), _torch(model, x, h, c))


def test_card_describes_the_artifact(artifact: Path) -> None:
    card = _card(artifact)
    checkpoint = load_checkpoint(artifact)
    assert set(card) == CARD_KEYS
    assert card["format_version"] == 1
    assert card["name"] == artifact.name
    assert (card["task"], card["cell"], card["opset"]) == (checkpoint.task.name, "lstm", 17)
    assert (card["layers"], card["hidden"]) == (checkpoint.config.num_layers, checkpoint.config.hidden_size)
    assert card["onnx_sha256"] == hashlib.sha256((artifact / ONNX_FILE).read_bytes()).hexdigest()
    assert card["output"]["labels"] == checkpoint.task.output_labels
    assert card["training"] == checkpoint.metrics
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
    assert tuple(arg.name for arg in session.get_inputs()) == INPUT_NAMES
    assert tuple(arg.name for arg in session.get_outputs()) == OUTPUT_NAMES


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
    assert tokens["input"] == {"kind": "tokens", "size": len(tokens["vocabulary"]), "dtype": "int64"}
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


def test_gru_checkpoint_is_refused(tmp_path: Path, random_checkpoint: CheckpointFactory) -> None:
    random_checkpoint(tmp_path, "language", cell="gru")
    with pytest.raises(ExportError, match=r"only LSTM models are exported.*'gru'"):
        export_artifact(tmp_path)
    assert not (tmp_path / ONNX_FILE).exists() and not (tmp_path / CARD_FILE).exists()


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

    def drifted(model: SequenceModel, metadata: dict[str, str]) -> Any:
        twin = copy.deepcopy(model)  # a graph that no longer matches the checkpoint's weights
        with torch.no_grad():
            twin.head.bias.add_(drift)
        return to_onnx(twin, metadata)

    monkeypatch.setattr(artifact_module, "to_onnx", drifted)
    miss = rf"parity check failed.*ort vs torch: max \|a-b\|/\(1\+\|b\|\) \S+ \(abs {figure}"
    with pytest.raises(ExportError, match=miss):
        export_artifact(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pt"]
