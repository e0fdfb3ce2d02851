"""Drive a server's Open Inference Protocol (KServe v2 gRPC) with tritonclient.grpc itself, as Triton's users
would, and write what came back as JSON for a test to compare.

It runs in .venv-triton (`make triton-client`), never in .venv: tritonclient 2.51 needs numpy<2 and
protobuf<5. So it imports nothing of Conveyor, and the test that runs it reads only its JSON.

    .venv-triton/bin/python scripts/triton_driver.py SCENARIO --target HOST:PORT --model NAME \
        --input IN.json --out OUT.json [--header 'name: value' ...] [--timeout S]

Scenarios and their input file:
- unary: a list of sequences {"id": int or str, "inputs": [time] token ids or [time][features] floats,
  "chunks": [sizes, summing to time], "dtype": "INT64" or "FP32"}; each sequence's chunks go as
  client.infer calls in order, the first with sequence_start, the last with sequence_end.
- stream: the same sequences, all interleaved on one start_stream / async_stream_infer stream: chunk k of
  every sequence is sent before chunk k+1 of any.
- failover: the stream scenario in rounds (round k: chunk k of every sequence, all answered before round k+1),
  each request carrying its sequence_offset; after round --pause-after it prints "paused" and waits for a
  line on stdin (a test kills the replica then). A stream that breaks is started again, and the round's
  unanswered requests are resent with the same offsets: exactly-once on whichever replica answers.
- errors: a list of cases, each one client.infer call meant to fail: {"name": str, "inputs": the whole
  tensor, batch first, "dtype": str, optional "sequence_id" (none sent when absent), "start" (default true),
  "end" (default false), "input_name" (default the model's), "shape" (a declared shape other than the
  data's), "outputs" (names to request), "model", "version", "parameters" (extra request parameters)}.

Output: {"sequences": {key: [rows of y, [time][outputs], or null when no result came, one per chunk]},
"errors": [{"sequence", "chunk", "request_id" (unary) or "name" (errors), "status", "message"}],
"ids": [the response ids in the order they arrived], "restarts": streams started again (failover only)}.
A sequence's key is its id as JSON text (json.dumps), so int 5 ("5") and string "5" ('"5"') stay two
sequences, as they are on the server. Request ids are "<sequence's index>/<chunk>".

tritonclient hands a stream's in-band error to the callback as a bare message, with no status and no request
id (it builds InferenceServerException from error_message alone), so a stream's errors cannot be tied to
requests: the requests that got no result are the chunks left null.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton  # type: ignore[import-not-found]  # in .venv-triton only
from tritonclient.utils import (  # type: ignore[import-not-found]
    InferenceServerException,
    triton_to_np_dtype,
)


@dataclass(frozen=True)
class Sequence:
    """One sequence of the input file, cut into its chunks."""

    index: int
    id: int | str
    inputs: np.ndarray
    chunks: list[int]
    dtype: str

    @property
    def key(self) -> str:
        return json.dumps(self.id)

    def spans(self) -> list[tuple[int, int]]:
        bounds = [0, *itertools.accumulate(self.chunks)]
        if bounds[-1] != len(self.inputs):
            raise ValueError(
                f"sequence {self.key}: chunks sum to {bounds[-1]}, inputs have {len(self.inputs)}"
            )
        return list(itertools.pairwise(bounds))

    def request_id(self, chunk: int) -> str:
        return f"{self.index}/{chunk}"


@dataclass
class Record:
    """What the server answered; written out as the driver's JSON."""

    results: dict[str, list[Any]] = field(default_factory=dict)  # response id (the request's) -> y's rows
    errors: list[dict[str, Any]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def add_result(self, result: Any, output: str) -> None:
        # Keyed on the id the server echoed, so a wrong echo leaves the request's chunk null.
        response_id: str = result.get_response().id
        rows: list[Any] = result.as_numpy(output)[0].tolist()  # drop the batch of one
        self.results[response_id] = rows
        self.ids.append(response_id)

    def to_json(self, sequences: list[Sequence]) -> dict[str, Any]:
        per_sequence = {
            s.key: [self.results.get(s.request_id(k)) for k in range(len(s.chunks))] for s in sequences
        }
        return {"sequences": per_sequence, "errors": self.errors, "ids": self.ids}


def describe(error: Any) -> dict[str, Any]:
    """status() is e.g. "StatusCode.INVALID_ARGUMENT" for a call's, None for a stream's in-band error."""
    return {"status": error.status(), "message": error.message()}


def make_input(name: str, data: np.ndarray, dtype: str, shape: list[int] | None = None) -> Any:
    tensor = triton.InferInput(name, list(data.shape), dtype)
    tensor.set_data_from_numpy(data)
    if shape is not None:  # sent as declared, whatever the data holds: the server must refuse it
        tensor.set_shape(shape)
    return tensor


def load_sequences(items: list[dict[str, Any]]) -> list[Sequence]:
    return [
        Sequence(
            i,
            item["id"],
            np.asarray(item["inputs"], triton_to_np_dtype(item["dtype"])),
            item["chunks"],
            item["dtype"],
        )
        for i, item in enumerate(items)
    ]


def chunk_inputs(sequence: Sequence, span: tuple[int, int], input_name: str) -> list[Any]:
    a, b = span
    return [make_input(input_name, sequence.inputs[a:b][np.newaxis], sequence.dtype)]  # batch of one


def run_unary(
    client: Any, args: argparse.Namespace, names: tuple[str, str], items: list[Any]
) -> dict[str, Any]:
    record, sequences = Record(), load_sequences(items)
    for sequence in sequences:
        spans = sequence.spans()
        for k, span in enumerate(spans):
            request_id = sequence.request_id(k)
            try:
                result = client.infer(
                    args.model,
                    chunk_inputs(sequence, span, names[0]),
                    request_id=request_id,
                    sequence_id=sequence.id,
                    sequence_start=k == 0,
                    sequence_end=k == len(spans) - 1,
                    headers=args.headers,
                )
            except InferenceServerException as error:
                # The sequence's state is now unknown to us: its later chunks would test nothing.
                record.errors.append(
                    {"sequence": sequence.key, "chunk": k, "request_id": request_id} | describe(error)
                )
                break
            record.add_result(result, names[1])
    return record.to_json(sequences)


class Collector:
    """The stream's callback: tritonclient calls it from its response thread, once per response."""

    def __init__(self, expected: int, output: str) -> None:
        self.record, self.expected, self.output = Record(), expected, output
        self.lock, self.done = threading.Lock(), threading.Event()

    def __call__(self, result: Any, error: Any) -> None:  # tritonclient passes both by keyword
        with self.lock:
            if error is not None:
                self.record.errors.append(describe(error))
                if error.status() is not None:  # the stream itself failed: nothing more will come
                    self.done.set()
            else:
                self.record.add_result(result, self.output)
            if len(self.record.results) + len(self.record.errors) >= self.expected:
                self.done.set()


class Rounds:
    """The failover scenario's callback: answers by request id, and whether the stream broke."""

    def __init__(self, output: str) -> None:
        self.record, self.output = Record(), output
        self.changed = threading.Condition()
        self.broken = False

    def __call__(self, result: Any, error: Any) -> None:
        with self.changed:
            if error is None:
                self.record.add_result(result, self.output)
            elif error.status() is None:  # in band: a request refused, the stream goes on
                self.record.errors.append(describe(error))
            else:
                self.broken = True
            self.changed.notify_all()

    def unanswered(self, ids: list[str]) -> list[str]:
        return [i for i in ids if i not in self.record.results]

    def wait(self, ids: list[str], timeout: float) -> None:
        """Until every id is answered, the stream breaks, a request is refused, or `timeout`."""
        with self.changed:
            self.changed.wait_for(
                lambda: self.broken or self.record.errors or not self.unanswered(ids), timeout
            )


def send_round_robin(
    client: Any, model: str, input_name: str, sequences: list[Sequence], plans: list[list[tuple[int, int]]]
) -> None:
    """Chunk k of every sequence before chunk k+1 of any; the shorter sequences end early."""
    for k in range(max(map(len, plans), default=0)):
        for sequence, spans in zip(sequences, plans, strict=True):
            if k < len(spans):
                client.async_stream_infer(
                    model,
                    chunk_inputs(sequence, spans[k], input_name),
                    request_id=sequence.request_id(k),
                    sequence_id=sequence.id,
                    sequence_start=k == 0,
                    sequence_end=k == len(spans) - 1,
                )


def run_stream(
    client: Any, args: argparse.Namespace, names: tuple[str, str], items: list[Any]
) -> dict[str, Any]:
    sequences = load_sequences(items)
    plans = [s.spans() for s in sequences]
    collector = Collector(sum(map(len, plans)), names[1])
    client.start_stream(callback=collector, headers=args.headers)
    try:
        send_round_robin(client, args.model, names[0], sequences, plans)
    except InferenceServerException as error:  # the stream broke: tritonclient refuses to send more
        with collector.lock:
            collector.record.errors.append({"sending": True} | describe(error))
        collector.done.set()
    finished = collector.done.wait(args.timeout)
    client.stop_stream(cancel_requests=not finished)  # cancel only what would never come
    with collector.lock:
        if not finished:
            collector.record.errors.append({"status": "timeout", "message": f"no answer in {args.timeout} s"})
        return collector.record.to_json(sequences)


def send_round(
    client: Any, model: str, input_name: str, round_: list[tuple[Sequence, int, tuple[int, int]]]
) -> None:
    for sequence, k, span in round_:
        client.async_stream_infer(
            model,
            chunk_inputs(sequence, span, input_name),
            request_id=sequence.request_id(k),
            sequence_id=sequence.id,
            sequence_start=k == 0,
            sequence_end=span[1] == len(sequence.inputs),
            parameters={"sequence_offset": span[0]},
        )


def run_failover(
    client: Any, args: argparse.Namespace, names: tuple[str, str], items: list[Any]
) -> dict[str, Any]:
    sequences = load_sequences(items)
    plans = [s.spans() for s in sequences]
    rounds, restarts = Rounds(names[1]), 0
    client.start_stream(callback=rounds, headers=args.headers)
    for k in range(max(map(len, plans), default=0)):
        round_ = [(s, k, spans[k]) for s, spans in zip(sequences, plans, strict=True) if k < len(spans)]
        ids = [s.request_id(k) for s, _, _ in round_]
        for _ in range(args.attempts):
            left = set(rounds.unanswered(ids))
            if not left or rounds.record.errors:
                break
            try:
                send_round(client, args.model, names[0], [r for r in round_ if r[0].request_id(k) in left])
            except InferenceServerException:  # the stream had already broken: tritonclient sends no more
                rounds.broken = True
            rounds.wait(ids, args.timeout)
            if rounds.broken:  # a new stream, which the proxy routes to a live replica
                client.stop_stream(cancel_requests=True)
                time.sleep(0.2)
                rounds.broken, restarts = False, restarts + 1
                client.start_stream(callback=rounds, headers=args.headers)
        if k + 1 == args.pause_after:
            print("paused", flush=True)
            sys.stdin.readline()
    client.stop_stream()
    return rounds.record.to_json(sequences) | {"restarts": restarts}


def run_case(client: Any, args: argparse.Namespace, input_name: str, case: dict[str, Any]) -> dict[str, Any]:
    data = np.asarray(case["inputs"], triton_to_np_dtype(case["dtype"]))
    tensor = make_input(case.get("input_name", input_name), data, case["dtype"], case.get("shape"))
    outputs = [triton.InferRequestedOutput(name) for name in case.get("outputs", [])] or None
    try:
        client.infer(
            case.get("model", args.model),
            [tensor],
            model_version=case.get("version", ""),
            outputs=outputs,
            request_id=case["name"],
            sequence_id=case.get("sequence_id", 0),  # tritonclient sends no sequence parameters for 0
            sequence_start=case.get("start", True),
            sequence_end=case.get("end", False),
            headers=args.headers,
            parameters=case.get("parameters"),
        )
    except InferenceServerException as error:
        return {"name": case["name"]} | describe(error)
    return {"name": case["name"], "status": None, "message": "the call succeeded"}


def run_errors(
    client: Any, args: argparse.Namespace, names: tuple[str, str], items: list[Any]
) -> dict[str, Any]:
    errors = [run_case(client, args, names[0], case) for case in items]
    return {"sequences": {}, "errors": errors, "ids": []}


SCENARIOS = {"unary": run_unary, "stream": run_stream, "failover": run_failover, "errors": run_errors}


def io_names(client: Any, model: str) -> tuple[str, str]:
    """The model's input and output names as its metadata gives them, as a Triton client finds them."""
    metadata: dict[str, Any] = client.get_model_metadata(model, as_json=True)
    return metadata["inputs"][0]["name"], metadata["outputs"][0]["name"]


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"a header is 'name: value', got {text!r}")
    return name.strip().lower(), value.strip()  # gRPC metadata keys are lower case


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--target", required=True, help="HOST:PORT of the gRPC server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--header", action="append", type=parse_header, default=[], help="'name: value'")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a stream's answers")
    parser.add_argument("--pause-after", type=int, default=0, help="failover: the round to pause after")
    parser.add_argument("--attempts", type=int, default=5, help="failover: streams tried per round")
    args = parser.parse_args(argv)
    args.headers = dict(args.header) or None
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    items = json.loads(args.input.read_text())
    client = triton.InferenceServerClient(url=args.target)
    try:
        output = SCENARIOS[args.scenario](client, args, io_names(client, args.model), items)
    finally:
        client.close()
    args.out.write_text(json.dumps(output))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
