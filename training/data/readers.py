"""A user's data file read as sequences with targets, for `conveyor train --data FILE`.

Four formats, told apart by the file's suffix: long tables (CSV, Parquet: one row per step, a column naming
the sequence), NumPy archives (.npz: padded arrays) and the UEA/UCR archive's .ts text. Whatever the format,
the result is the same `SequenceData`. A file that cannot be read as sequences raises `DataFileError`, whose
message names the file, the line, row or column, and what was expected: these are a user's mistakes, so
they read as sentences, not tracebacks. Only numpy and the standard library are needed; pyarrow only for
Parquet, imported where a Parquet file is read.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from training.data.ts_format import TsFormatError, finite_floats, is_finite_float, parse_ts

SUFFIXES = (".csv", ".parquet", ".pq", ".npz", ".ts")
Objective = Literal["classification", "regression"]


class DataFileError(ValueError):
    """A data file that cannot be read as sequences; the message names the file and the row (1-based line,
    counting the header as line 1 for CSV) or the column, and says what was expected."""


@dataclass(frozen=True)
class Columns:
    """How a long-format table (CSV, Parquet) maps to sequences."""

    sequence: str = "sequence"  # the sequence id column
    # Sorted numerically within a sequence (a step twice is an error); None: the rows' order in the file.
    order: str | None = "step"
    target: str = "target"
    features: tuple[str, ...] | None = None  # None: every other column


@dataclass(frozen=True)
class SequenceData:
    """Sequences of feature vectors and their targets, as every reader returns them."""

    sequences: list[np.ndarray]  # float32 [T_i, F] each, in first-appearance order of their ids
    ids: list[str]
    feature_names: list[str]
    # Per sequence: classification -> int64 [T_i] (per step) or [1] (per sequence);
    # regression -> float32 [T_i, K] or [1, K].
    targets: list[np.ndarray]
    per_step: bool  # targets vary along each sequence (else one target per sequence)
    classes: list[str] | None  # class names (targets index into it), sorted; None for regression
    target_names: list[str]  # regression: the target columns' names; classification: [target column]


def read_sequences(
    path: Path, columns: Columns = Columns(), objective: Objective = "classification"
) -> SequenceData:
    """The sequences in `path`, read by its suffix; `columns` applies to CSV and Parquet only."""
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    try:
        return _read(path, columns, objective)
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not UTF-8 text") from error
    except OSError as error:
        raise DataFileError(f"{path}: cannot be read ({error.strerror or error})") from error


def _read(path: Path, columns: Columns, objective: Objective) -> SequenceData:
    match path.suffix.lower():
        case ".csv":
            return _table_sequences(_read_csv(path), columns, objective)
        case ".parquet" | ".pq":
            return _table_sequences(_read_parquet(path), columns, objective)
        case ".npz":
            return _npz_sequences(path, objective)
        case ".ts":
            return _ts_sequences(path, objective)
    raise DataFileError(
        f"{path}: unknown data format {path.suffix or '(no suffix)'!r}: expected one of {', '.join(SUFFIXES)}"
    )


# Long tables (CSV, Parquet) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """A long-format table: its columns by name, in file order, and where a row is, for messages."""

    path: Path
    columns: dict[str, np.ndarray]
    nulls: dict[str, np.ndarray]  # Parquet: the rows where a column holds no value (CSV has no nulls)
    where: Callable[[int], str]  # row index -> "line 7" (CSV: the header is line 1) or "row 6" (Parquet)

    def column(self, name: str) -> np.ndarray:
        """The values of column `name`; a null among them is an error naming its row."""
        if name in self.nulls and self.nulls[name].any():
            raise self.error(int(np.argmax(self.nulls[name])), name, "no value")
        return self.columns[name]

    def error(self, row: int, name: str, what: str) -> DataFileError:
        return DataFileError(f"{self.path}: {self.where(row)}, column {name!r}: {what}")


def _read_csv(path: Path) -> _Table:
    with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet's byte-order mark
        reader = csv.reader(file, skipinitialspace=True)
        try:
            header = next((row for row in reader if row), None)  # blank lines are skipped
            if header is None:
                raise DataFileError(f"{path}: the file is empty: expected a header row naming the columns")
            rows, lines = [], []
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataFileError(
                        f"{path}: line {reader.line_num}: {len(row)} fields, expected {len(header)} as in "
                        "the header"
                    )
                rows.append(row)
                lines.append(reader.line_num)
        except csv.Error as error:
            raise DataFileError(f"{path}: line {reader.line_num}: {error}") from error
    _check_column_names(path, header)
    if not rows:
        raise DataFileError(f"{path}: no rows after the header: expected one row per step")
    columns = {name: np.array(values) for name, values in zip(header, zip(*rows, strict=True), strict=True)}
    return _Table(path, columns, {}, lambda row: f"line {lines[row]}")


def _read_parquet(path: Path) -> _Table:
    try:
        import pyarrow.parquet as parquet  # type: ignore[import-untyped]
    except ImportError as error:
        raise DataFileError(f"{path}: reading Parquet needs pyarrow: pip install 'conveyor[data]'") from error
    try:
        table = parquet.read_table(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError, its I/O errors OSError
        raise DataFileError(f"{path}: not a readable Parquet file ({error})") from error
    _check_column_names(path, table.column_names)
    if table.num_rows == 0:
        raise DataFileError(f"{path}: no rows: expected one row per step")
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    nulls = {
        name: table.column(name).is_null().to_numpy(zero_copy_only=False)
        for name in table.column_names
        if table.column(name).null_count
    }
    return _Table(path, columns, nulls, lambda row: f"row {row + 1}")


def _check_column_names(path: Path, names: list[str]) -> None:
    for position, name in enumerate(names, start=1):
        if not name:
            raise DataFileError(f"{path}: column {position} has no name: expected a name for every column")
        if names.index(name) != position - 1:
            raise DataFileError(f"{path}: column {name!r} appears twice: expected distinct column names")


def _table_sequences(table: _Table, columns: Columns, objective: Objective) -> SequenceData:
    feature_names = _feature_names(table, columns)
    ids = _text(table, columns.sequence, "a sequence id")
    order = columns.order
    keys = np.arange(len(ids), dtype=np.float64) if order is None else _numbers(table, order, np.float64)
    names, groups = _group_rows(ids, keys)
    if order is not None:
        _check_steps_distinct(table, order, ids, keys, groups)
    x = np.stack([_numbers(table, name, np.float32) for name in feature_names], axis=1)
    per_step, classes, targets = _table_targets(table, columns.target, objective, groups)
    sequences = [x[rows] for rows in groups]
    return SequenceData(sequences, names, feature_names, targets, per_step, classes, [columns.target])


def _table_targets(
    table: _Table, name: str, objective: Objective, groups: list[np.ndarray]
) -> tuple[bool, list[str] | None, list[np.ndarray]]:
    """(per_step, classes, targets) of the target column, split by sequence (`groups`: their rows)."""
    if objective == "regression":
        values = _numbers(table, name, np.float32)[:, None]
        per_step, targets = _collapse_constant([values[rows] for rows in groups])
        return per_step, None, targets
    labels = _text(table, name, "a class label", " (numbers to predict: the regression objective)")
    per_step, runs = _collapse_constant([labels[rows] for rows in groups])
    classes, targets = _encode_classes(runs)
    return per_step, classes, targets


def _feature_names(table: _Table, columns: Columns) -> list[str]:
    """The feature columns, after checking every named column is there (roles first: a missing target
    column is the error to report, not a text column taken as a feature because of it)."""
    roles = [("the sequence id", columns.sequence), ("the target", columns.target)]
    roles += [] if columns.order is None else [("the order", columns.order)]
    roles += [("a feature", name) for name in columns.features or ()]
    for role, name in roles:
        if name not in table.columns:
            raise DataFileError(
                f"{table.path}: no column {name!r} ({role} column); "
                f"the columns are: {', '.join(table.columns)}"
            )
    if columns.features is not None:
        names = list(columns.features)
    else:
        names = [
            name for name in table.columns if name not in {columns.sequence, columns.target, columns.order}
        ]
    if not names:
        raise DataFileError(
            f"{table.path}: no feature columns: expected at least one beside the ids and targets"
        )
    return names


def _text(table: _Table, name: str, what: str, hint: str = "") -> np.ndarray:
    """Column `name` as strings (ids, class labels): text or whole numbers, never empty."""
    values = table.column(name)
    if values.dtype.kind == "f":
        raise DataFileError(
            f"{table.path}: column {name!r} holds fractional numbers ({values.dtype}): "
            f"expected {what} as text or whole numbers{hint}"
        )
    text = values.astype(str)
    empty = text == ""
    if empty.any():
        raise table.error(int(np.argmax(empty)), name, f"an empty field: expected {what}")
    return text


def _numbers(table: _Table, name: str, dtype: type[np.float32] | type[np.float64]) -> np.ndarray:
    """Column `name` as finite numbers of `dtype`; the first value that is not one names its row."""
    values = table.column(name)
    numbers = finite_floats(values, dtype)
    if numbers is None:
        row = next(i for i, value in enumerate(values) if not is_finite_float(value, dtype))
        raise table.error(row, name, f"expected a finite number, got {_shown(values[row])}")
    return numbers


def _shown(value: object) -> str:
    return "an empty field" if value == "" else repr(str(value))


def _group_rows(ids: np.ndarray, keys: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """The sequences' ids in first-appearance order, and each one's rows sorted by `keys`."""
    unique, first_rows, inverse = np.unique(ids, return_index=True, return_inverse=True)
    appearance = np.argsort(first_rows)  # the k-th sequence to appear is unique[appearance[k]]
    rank = np.empty_like(appearance)
    rank[appearance] = np.arange(len(appearance))
    group = rank[inverse]
    rows = np.lexsort((keys, group))  # by sequence, then by key; stable, so equal keys keep file order
    bounds = np.cumsum(np.bincount(group))[:-1]
    return [str(unique[i]) for i in appearance], np.split(rows, bounds)


def _check_steps_distinct(
    table: _Table, order: str, ids: np.ndarray, keys: np.ndarray, groups: list[np.ndarray]
) -> None:
    """Each sequence's order keys are distinct: two rows at one step leave their order undefined."""
    for rows in groups:
        repeated = np.flatnonzero(
            np.diff(keys[rows]) == 0
        )  # `rows` are sorted by key: repeats are neighbours
        if repeated.size:
            first, second = sorted(rows[repeated[0] : repeated[0] + 2])
            raise DataFileError(
                f"{table.path}: sequence {str(ids[first])!r} has {order} {table.columns[order][first]} twice "
                f"({table.where(first)} and {table.where(second)}): expected each step once"
            )


def _collapse_constant(runs: list[np.ndarray]) -> tuple[bool, list[np.ndarray]]:
    """(per_step, targets): where every sequence's target is constant along it, one target per sequence."""
    per_step = any((run != run[0]).any() for run in runs)
    return per_step, runs if per_step else [run[:1] for run in runs]


def _encode_classes(runs: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """The sorted class names of string label runs, and the runs as int64 indices into them."""
    classes, codes = np.unique(np.concatenate(runs), return_inverse=True)
    bounds = np.cumsum([len(run) for run in runs])[:-1]
    return [str(name) for name in classes], np.split(codes.astype(np.int64), bounds)


# NumPy archives ------------------------------------------------------------------------------------------


def _npz_sequences(path: Path, objective: Objective) -> SequenceData:
    arrays = _load_npz(path)
    x = _array(path, arrays, "x")
    if x.ndim != 3 or x.size == 0 or x.dtype.kind not in "biuf":
        raise DataFileError(
            f"{path}: array 'x' is {x.dtype} of shape {list(x.shape)}: expected numbers [N, T, F] "
            "(sequences, steps, features), padded at the end, with 'lengths' [N] where the sequences' "
            "lengths differ"
        )
    lengths = _lengths(path, arrays, x.shape[0], x.shape[1])
    sequences = [_finite32(path, "x", x[i, :length], i) for i, length in enumerate(lengths)]
    y = _array(path, arrays, "y")
    rows = len(y) if y.ndim else 0  # a 0-d array has no len()
    if rows != len(x):
        raise DataFileError(f"{path}: array 'y' has {rows} rows, 'x' {len(x)} sequences")
    if objective == "classification":
        per_step, classes, targets = _npz_classes(path, y, lengths, x.shape[1])
        target_names = ["y"]
    else:
        per_step, targets = _npz_values(path, y, lengths, x.shape[1])
        classes, width = None, targets[0].shape[1]
        target_names = ["y"] if width == 1 else [f"y_{k}" for k in range(width)]
    ids = [str(i) for i in range(len(sequences))]
    features = _npz_feature_names(path, arrays, x.shape[2])
    return SequenceData(sequences, ids, features, targets, per_step, classes, target_names)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise DataFileError(
            f"{path}: not a NumPy .npz archive (expected a zip of arrays, as np.savez writes)"
        )
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for name in archive.files:
                try:
                    arrays[name] = archive[name]
                except ValueError as error:  # an object array: loading one would run the pickle inside it
                    raise DataFileError(
                        f"{path}: array {name!r} holds Python objects, which are not loaded: for "
                        "sequences of different lengths save 'x' padded to [N, T, F] with 'lengths' [N]"
                    ) from error
    except (zipfile.BadZipFile, EOFError) as error:
        raise DataFileError(f"{path}: not a readable .npz archive ({error})") from error
    return arrays


def _array(path: Path, arrays: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in arrays:
        raise DataFileError(f"{path}: no array {name!r}; the archive holds: {', '.join(arrays) or 'nothing'}")
    return arrays[name]


def _lengths(path: Path, arrays: dict[str, np.ndarray], count: int, steps: int) -> list[int]:
    """Each sequence's valid prefix: 'lengths' where given, else every step of the padded 'x'."""
    if "lengths" not in arrays:
        return [steps] * count
    lengths = arrays["lengths"]
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or len(lengths) != count:
        raise DataFileError(
            f"{path}: array 'lengths' is {lengths.dtype} of shape {list(lengths.shape)}: "
            f"expected {count} whole numbers, one per sequence of 'x'"
        )
    outside = np.flatnonzero((lengths < 1) | (lengths > steps))
    if outside.size:
        i = int(outside[0])
        raise DataFileError(
            f"{path}: array 'lengths': sequence {i} has length {lengths[i]}: "
            f"expected 1 to {steps} (the steps of 'x')"
        )
    return [int(length) for length in lengths]


def _finite32(path: Path, name: str, values: np.ndarray, sequence: int) -> np.ndarray:
    """`values` (one sequence's valid part) as float32, every one finite there."""
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf, reported below
        converted = values.astype(np.float32)
    bad = np.argwhere(~np.isfinite(converted))
    if bad.size:
        step = int(bad[0][0])
        raise DataFileError(
            f"{path}: array {name!r}: sequence {sequence}, step {step}: expected finite numbers, got "
            f"{values[tuple(bad[0])]}"
        )
    return converted


def _npz_classes(
    path: Path, y: np.ndarray, lengths: list[int], steps: int
) -> tuple[bool, list[str], list[np.ndarray]]:
    """Class labels from 'y' [N] (one per sequence) or [N, T] (one per step; padding ignored)."""
    if y.dtype.kind not in "iuUS" or y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] != steps):
        raise DataFileError(
            f"{path}: array 'y' is {y.dtype} of shape {list(y.shape)}: expected class labels "
            f"(whole numbers or strings) [N] (per sequence) or [N, {steps}] (per step)"
        )
    labels = y.astype(str)
    per_step = y.ndim == 2
    runs = [labels[i, :length] if per_step else labels[i : i + 1] for i, length in enumerate(lengths)]
    classes, targets = _encode_classes(runs)
    return per_step, classes, targets


def _npz_values(path: Path, y: np.ndarray, lengths: list[int], steps: int) -> tuple[bool, list[np.ndarray]]:
    """Regression targets from 'y' [N] or [N, K] (per sequence) or [N, T, K] (per step; padding ignored)."""
    shape_ok = y.ndim in (1, 2, 3) and y.size > 0 and (y.ndim < 3 or y.shape[1] == steps)
    if y.dtype.kind not in "biuf" or not shape_ok:
        raise DataFileError(
            f"{path}: array 'y' is {y.dtype} of shape {list(y.shape)}: expected numbers [N] or [N, K] (per "
            f"sequence) or [N, {steps}, K] (per step)"
        )
    per_step = y.ndim == 3
    rows = y if per_step else y.reshape(len(y), 1, -1)  # per sequence: [N, 1, K]
    targets = [
        _finite32(path, "y", rows[i, : length if per_step else 1], i) for i, length in enumerate(lengths)
    ]
    return per_step, targets


def _npz_feature_names(path: Path, arrays: dict[str, np.ndarray], count: int) -> list[str]:
    if "feature_names" not in arrays:
        return _default_feature_names(count)
    names = arrays["feature_names"]
    if names.ndim != 1 or names.dtype.kind not in "US" or len(names) != count:
        raise DataFileError(
            f"{path}: array 'feature_names' is {names.dtype} of shape {list(names.shape)}: expected {count} "
            "strings, one per feature of 'x'"
        )
    return [str(name) for name in names.astype(str)]


def _default_feature_names(count: int) -> list[str]:
    return [f"dim_{i}" for i in range(count)]


# UEA/UCR .ts text ----------------------------------------------------------------------------------------


def _ts_sequences(path: Path, objective: Objective) -> SequenceData:
    try:
        with path.open(encoding="utf-8-sig") as file:
            cases = parse_ts(file)
    except TsFormatError as error:
        raise DataFileError(f"{path}: {error}") from error
    if objective == "classification" and cases.classes is None:
        raise DataFileError(
            f"{path}: the cases have regression targets (@targetLabel): use the regression objective"
        )
    if objective == "regression" and cases.classes is not None:
        raise DataFileError(
            f"{path}: the cases have class labels (@classLabel): use the classification objective"
        )
    ids = [str(i) for i in range(len(cases.series))]
    features = _default_feature_names(cases.series[0].shape[1])
    if cases.classes is None:
        values = [np.array([[float(label)]], np.float32) for label in cases.labels]
        return SequenceData(cases.series, ids, features, values, False, None, ["target"])
    index = {name: i for i, name in enumerate(cases.classes)}
    codes = [np.array([index[label]], np.int64) for label in cases.labels]
    return SequenceData(cases.series, ids, features, codes, False, cases.classes, ["class"])
