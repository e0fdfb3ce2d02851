"""The manual's `export_module` example (docs/models.md), run as it stands: the code people copy must work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(120)

EXAMPLE_PAGE = Path(__file__).resolve().parent.parent / "docs" / "models.md"


def _example() -> str:
    """The first python block after the heading of the `export_module` section."""
    text = EXAMPLE_PAGE.read_text()
    section = text[text.index("## Your own PyTorch module: `export_module`") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "docs/models.md has no python block in its export_module section"
    return match.group(1)


def test_the_export_module_example_runs_and_writes_a_servable_artifact(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_example())
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout.strip().splitlines()[-1]
    assert printed.startswith("[('g', [1, 'batch', 64]), ('h', [2, 'batch', 64]), ('c', [2, 'batch', 64])]")
    assert float(printed.rsplit(" ", 1)[1]) <= 1e-5  # ONNX Runtime vs PyTorch, scaled
    card = json.loads((tmp_path / "artifacts" / "tagger" / "model.json").read_text())
    assert [tensor["input"] for tensor in card["state"]] == ["g0", "h0", "c0"]
    assert card["output"]["labels"] == ["noun", "verb", "adj", "adv", "other"]
