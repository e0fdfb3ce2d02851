"""The ONNX Runtime runner's split of a large batch into calls run at once (`ort_parallel_calls`): the rows'
outputs and new states equal one call's, for state whose batch axis is first (an LSTM's h and c) or not
(silero VAD's [2, batch, 128]), and a batch under the threshold runs as one call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from serving_harness import assert_close

from modelcard.graph import random_inputs, random_states
from serving.server.onnx_runner import MIN_SPLIT_ROWS, OnnxStepRunner


@pytest.mark.parametrize("artifact_name", ["token_artifact", "feature_artifact", "vad_artifact"])
@pytest.mark.parametrize("rows", [MIN_SPLIT_ROWS - 1, MIN_SPLIT_ROWS, 97])
def test_parallel_calls_equal_one_call(artifact_name: str, rows: int, request: pytest.FixtureRequest) -> None:
    artifact: Path = request.getfixturevalue(artifact_name)
    one = OnnxStepRunner.load(artifact)
    three = OnnxStepRunner.load(artifact, parallel_calls=3)
    spec, rng = one.spec, np.random.default_rng(rows)
    if spec.framing is None:
        x = random_inputs(spec, rows, 3, rng)
    else:  # a framed model's runner takes windows: [rows, windows, context + window samples]
        x = rng.standard_normal((rows, 3, spec.framing.width), dtype=np.float32)
    states = one.spec.layout.pack(random_states(spec, rows, rng), rows)
    y_one, states_one = one.run(x, states)
    y_three, states_three = three.run(x, states)
    assert_close(y_three, y_one)
    assert_close(states_three, states_one)
