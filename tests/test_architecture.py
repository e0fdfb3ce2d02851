"""The layout's import rules, read from the source, and the domain running where no runtime is installed.

Which part may import which (first-party), and which libraries each part must not touch. The rules keep the
tree honest: the client installs without the server, the serving image has no torch, and the domain (the
session contract) is testable with a fake runner and no gRPC.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("modelcard", "training", "export", "serving")

# Part -> the first-party parts it may import. A module's part is its longest listed prefix.
_SERVER_SIDE = {"serving.server", "serving.domain", "serving.wire", "modelcard"}
ALLOWED: dict[str, set[str]] = {
    "modelcard": {"modelcard"},
    "training": {"training"},
    "export": {"export", "training", "modelcard"},
    "serving": set(),
    "serving.wire": {"serving.wire"},
    "serving.domain": {"serving.domain", "modelcard"},
    "serving.server": _SERVER_SIDE,
    "serving.client": {"serving.client", "serving.wire"},
    "serving.bench": {"serving.bench", "serving.client", *_SERVER_SIDE},
    "serving.cli": {"serving.cli", "serving.bench", "serving.client", "training", "export", *_SERVER_SIDE},
}
# Reached only from inside a function (lazily): torch is not installed where `conveyor serve` runs.
LAZY_ONLY = {"serving.cli": {"training", "export"}}
# Libraries a part must never import.
FORBIDDEN_LIBRARIES: dict[str, set[str]] = {
    "modelcard": {"torch", "onnxruntime", "grpc", "onnx"},
    "serving": {"torch", "onnx"},
    "serving.domain": {"grpc", "grpc_health", "grpc_reflection", "onnxruntime", "prometheus_client", "redis"},
    "serving.wire": {"onnxruntime"},
    "serving.client": {"onnxruntime"},
}
ONNXRUNTIME_HOME = "serving.server.onnx_runner"  # the one serving module that may load the runtime
# The artifact contract's modules that run graphs (the checks every artifact passes): they may load
# onnxruntime, and the parts that must not load it must not import them either.
MODELCARD_RUNTIME = {"modelcard.graph", "modelcard.adopt"}


def _modules() -> Iterator[tuple[str, Path]]:
    for package in FIRST_PARTY:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_proto" in path.parts:
                continue  # generated code
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _part(module: str, parts: Mapping[str, object]) -> str | None:
    candidates = [p for p in parts if module == p or module.startswith(p + ".")]
    return max(candidates, key=len, default=None)


def _imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement."""

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                yield from ((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                yield child.module, child.lineno, in_function
            yield from visit(child, nested)

    yield from visit(ast.parse(path.read_text()), False)


def _violations(modules: Iterable[tuple[str, Path]]) -> Iterator[str]:
    for module, path in modules:
        part = _part(module, ALLOWED)
        assert part is not None, f"{module} belongs to no part of the layout: add it to ALLOWED"
        where = path.name if not path.is_relative_to(ROOT) else path.relative_to(ROOT)
        for imported, line, lazy in _imports(path):
            top = imported.split(".")[0]
            if top in FIRST_PARTY:
                target = _part(imported, ALLOWED) or top
                if target not in ALLOWED[part]:
                    yield f"{where}:{line}: {part} must not import {imported}"
                elif (
                    imported in MODELCARD_RUNTIME
                    and module not in MODELCARD_RUNTIME
                    and "onnxruntime" in FORBIDDEN_LIBRARIES.get(part, ())
                ):
                    yield f"{where}:{line}: {part} must not import {imported}, which loads onnxruntime"
                elif target in LAZY_ONLY.get(part, set()) and not lazy:
                    yield f"{where}:{line}: {part} may import {imported} only inside a function"
                continue
            for ruled, libraries in FORBIDDEN_LIBRARIES.items():
                if top == "onnxruntime" and module in MODELCARD_RUNTIME:
                    continue
                if (module == ruled or module.startswith(ruled + ".")) and top in libraries:
                    yield f"{where}:{line}: {ruled} must not import {top}"
            if top == "onnxruntime" and module.startswith("serving.") and module != ONNXRUNTIME_HOME:
                yield f"{where}:{line}: only {ONNXRUNTIME_HOME} loads onnxruntime"


def test_every_import_keeps_the_layout_rules() -> None:
    assert list(_violations(_modules())) == []


def test_the_rules_catch_each_kind_of_breach(tmp_path: Path) -> None:
    """The checker itself, on modules written to break each rule once."""
    sources = {
        "serving.client.bad": "from serving.server.app import build_server\n",
        "serving.cli.bad": "from training.train import train\n\ndef lazy() -> None:\n    import export\n",
        "serving.domain.bad": "import grpc\n",
        "serving.server.bad": "import onnxruntime\n",
        "serving.domain.graph": "from modelcard.graph import Graph\n",
        "modelcard.bad": "import onnxruntime\n",
    }
    modules = []
    for module, source in sources.items():
        path = tmp_path / f"{module}.py"
        path.write_text(source)
        modules.append((module, path))
    assert sorted(_violations(modules)) == [
        "modelcard.bad.py:1: modelcard must not import onnxruntime",
        "serving.cli.bad.py:1: serving.cli may import training.train only inside a function",
        "serving.client.bad.py:1: serving.client must not import serving.server.app",
        "serving.domain.bad.py:1: serving.domain must not import grpc",
        "serving.domain.graph.py:1: serving.domain must not import modelcard.graph, which loads onnxruntime",
        f"serving.server.bad.py:1: only {ONNXRUNTIME_HOME} loads onnxruntime",
    ]


@pytest.mark.timeout(60)
def test_the_domain_runs_with_a_fake_runner_where_no_runtime_can_be_imported() -> None:
    """In a fresh interpreter where onnxruntime, grpc and torch cannot be imported: the domain (sessions,
    batcher, engine, chunk checks) imports and streams random chunkings of many sessions, interleaved and
    batched, with the same outputs as each sequence run whole."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        for blocked in ("onnxruntime", "grpc", "torch", "prometheus_client"):
            sys.modules[blocked] = None  # any import of it now raises ImportError
        sys.path.insert(0, sys.argv[1])
        import numpy as np
        from fakes import FAKE_SPEC, FakeRunner
        from serving.domain.batcher import Batcher
        from serving.domain.chunks import Chunk, ServedModel
        from serving.domain.engine import Engine
        from serving.domain.sessions.lifecycle import SessionLimits, Sessions
        from serving.domain.sessions.memory import InMemorySessionStore

        class Quiet:
            def __getattr__(self, name):
                return lambda *args: None

        async def main():
            model = ServedModel(FAKE_SPEC, 64, 60.0)
            sessions = Sessions(InMemorySessionStore(model.state_shape), SessionLimits(60, 3600, 100, False))
            runner = FakeRunner()
            batcher = Batcher(runner, max_batch_size=8, max_delay_ms=0, inline_max_ms=0.5, metrics=Quiet())
            engine = Engine(model, sessions, batcher, Quiet())
            rng = np.random.default_rng(0)
            sequences = {f"s{i}": rng.integers(0, FAKE_SPEC.input_size, 40) for i in range(12)}

            async def stream(session_id, x):
                cuts = sorted(set(rng.integers(1, len(x), 5).tolist()) | {0, len(x)})
                outputs = []
                for a, b in zip(cuts, cuts[1:]):
                    result = await engine.step(Chunk(session_id, x[a:b], a, start=a == 0))
                    outputs.append(result.outputs)
                return np.concatenate(outputs)

            streamed = await asyncio.gather(*(stream(s, x) for s, x in sequences.items()))
            zeros = np.zeros((1, FAKE_SPEC.state_size), np.float32)
            for (session_id, x), outputs in zip(sequences.items(), streamed):
                whole = FakeRunner().run(x[None], zeros)[0][0]
                assert np.array_equal(outputs, whole), session_id
            await engine.close(grace_s=1)
            batcher.close()
            assert max(batch for batch, _ in runner.calls) > 1, "no batching happened"

        asyncio.run(main())
        loaded = sorted(name for name in ("onnxruntime", "grpc", "torch") if sys.modules.get(name))
        print("domain ran without", "onnxruntime, grpc, torch; loaded:", loaded or "none")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded: none" in result.stdout, result.stdout
