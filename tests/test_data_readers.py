"""The readers behind `conveyor train --data FILE`: CSV, Parquet, NumPy .npz and UEA/UCR .ts files, read to
the same SequenceData; a user's mistake is a DataFileError naming the file and the line, row or column."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.data import Columns, DataFileError, SequenceData, read_sequences

pytestmark = pytest.mark.timeout(60)

# Two sequences, interleaved and out of order: "b" appears first, its steps 9 and 10 sort after 2 only
# numerically (as text "10" < "2" < "9").
INTERLEAVED_CSV = """\
sequence,step,x1,x2,target
b,10,3.5,30,cat
a,1,1.0,10,dog
b,2,0.5,0,cat
a,0,0.0,0,dog
b,9,1.5,10,cat
"""

TOY_TS = """\
# two cases of two dimensions, of lengths 3 and 2
% a comment as the archive's UnitTest files write them
@problemName Toy
@timeStamps false
@missing false
@univariate false
@dimensions 2
@equallength false
@classLabel true b a
@data

1,2,3:4,5,6:a
7,8:9,10:b
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _write_parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    import pyarrow as arrow  # type: ignore[import-untyped]
    import pyarrow.parquet as parquet  # type: ignore[import-untyped]

    parquet.write_table(arrow.table(columns), path)
    return path


def _assert_same(actual: SequenceData, expected: SequenceData) -> None:
    """Field by field: the arrays' values and dtypes, the rest by equality."""
    assert (actual.ids, actual.feature_names, actual.per_step) == (
        expected.ids,
        expected.feature_names,
        expected.per_step,
    )
    assert (actual.classes, actual.target_names) == (expected.classes, expected.target_names)
    for got, want in zip(
        actual.sequences + actual.targets, expected.sequences + expected.targets, strict=True
    ):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_csv_per_sequence_classification_sorts_steps_and_keeps_first_appearance(tmp_path: Path) -> None:
    data = read_sequences(_write(tmp_path, "toy.csv", INTERLEAVED_CSV))
    assert data.ids == ["b", "a"]
    assert data.feature_names == ["x1", "x2"]
    np.testing.assert_array_equal(data.sequences[0], [[0.5, 0], [1.5, 10], [3.5, 30]])
    np.testing.assert_array_equal(data.sequences[1], [[0.0, 0], [1.0, 10]])
    assert all(s.dtype == np.float32 for s in data.sequences)
    assert not data.per_step
    assert data.classes == ["cat", "dog"]
    assert [t.tolist() for t in data.targets] == [[0], [1]]
    assert all(t.dtype == np.int64 for t in data.targets)
    assert data.target_names == ["target"]


def test_csv_per_step_classification(tmp_path: Path) -> None:
    text = "sequence,step,x,target\ns1,0,0.1,rest\ns1,1,0.9,move\ns1,2,0.8,move\ns2,0,0.2,rest\n"
    data = read_sequences(_write(tmp_path, "steps.csv", text))
    assert data.per_step
    assert data.classes == ["move", "rest"]
    assert [t.tolist() for t in data.targets] == [[1, 0, 0], [1]]


def test_csv_named_columns_in_file_order(tmp_path: Path) -> None:
    text = "id,note,f,label\nu,x,3,yes\nu,y,1,yes\nv,z,2,no\n"
    columns = Columns(sequence="id", order=None, target="label", features=("f",))
    data = read_sequences(_write(tmp_path, "named.csv", text), columns)
    assert data.feature_names == ["f"]  # "note" is not a feature: the features were named
    np.testing.assert_array_equal(data.sequences[0], [[3], [1]])  # no order column: as the file has them
    assert data.target_names == ["label"]


def test_csv_regression_per_sequence_and_per_step(tmp_path: Path) -> None:
    constant = "sequence,step,x,target\na,0,1,0.5\na,1,2,0.5\nb,0,3,-2\n"
    data = read_sequences(_write(tmp_path, "constant.csv", constant), objective="regression")
    assert not data.per_step
    assert data.classes is None
    assert data.target_names == ["target"]
    assert [t.shape for t in data.targets] == [(1, 1), (1, 1)]
    assert [float(t[0, 0]) for t in data.targets] == [0.5, -2.0]
    assert all(t.dtype == np.float32 for t in data.targets)

    varying = "sequence,step,x,target\na,0,1,0.5\na,1,2,0.75\n"
    data = read_sequences(_write(tmp_path, "varying.csv", varying), objective="regression")
    assert data.per_step
    np.testing.assert_array_equal(data.targets[0], [[0.5], [0.75]])


def test_parquet_reads_the_same_table_as_csv(tmp_path: Path) -> None:
    csv_data = read_sequences(_write(tmp_path, "toy.csv", INTERLEAVED_CSV))
    table: dict[str, list[object]] = {
        "sequence": ["b", "a", "b", "a", "b"],
        "step": [10, 1, 2, 0, 9],
        "x1": [3.5, 1.0, 0.5, 0.0, 1.5],
        "x2": [30, 10, 0, 0, 10],
        "target": ["cat", "dog", "cat", "dog", "cat"],
    }
    for suffix in (".parquet", ".pq"):
        _assert_same(read_sequences(_write_parquet(tmp_path / f"toy{suffix}", table)), csv_data)


def test_parquet_integer_labels_read_as_their_text(tmp_path: Path) -> None:
    table: dict[str, list[object]] = {
        "sequence": [7, 7, 8],
        "step": [0, 1, 0],
        "x": [0.0, 1, 2],
        "target": [2, 2, 10],
    }
    data = read_sequences(_write_parquet(tmp_path / "ints.parquet", table))
    assert data.ids == ["7", "8"]
    assert data.classes == ["10", "2"]  # sorted as text, as a CSV's labels are
    assert [t.tolist() for t in data.targets] == [[1], [0]]


def test_npz_padded_with_lengths_per_sequence(tmp_path: Path) -> None:
    x = np.full((3, 4, 2), np.nan)  # NaN padding: only the valid prefixes must be finite
    x[0, :4], x[1, :2], x[2, :3] = 1.0, 2.0, 3.0
    path = tmp_path / "padded.npz"
    np.savez(
        path,
        x=x,
        lengths=np.array([4, 2, 3]),
        y=np.array(["walk", "run", "walk"]),
        feature_names=["ax", "ay"],
    )
    data = read_sequences(path)
    assert [s.shape for s in data.sequences] == [(4, 2), (2, 2), (3, 2)]
    assert all(np.isfinite(s).all() and s.dtype == np.float32 for s in data.sequences)
    assert data.feature_names == ["ax", "ay"]
    assert data.ids == ["0", "1", "2"]
    assert not data.per_step
    assert data.classes == ["run", "walk"]
    assert [t.tolist() for t in data.targets] == [[1], [0], [1]]


def test_npz_per_step_labels_ignore_the_padding(tmp_path: Path) -> None:
    y = np.array([[0, 1, 1], [2, -1, -1]])  # -1: padding past the second sequence's one step
    path = tmp_path / "steps.npz"
    np.savez(path, x=np.zeros((2, 3, 1)), lengths=np.array([3, 1]), y=y)
    data = read_sequences(path)
    assert data.per_step
    assert data.classes == ["0", "1", "2"]
    assert [t.tolist() for t in data.targets] == [[0, 1, 1], [2]]
    assert data.feature_names == ["dim_0"]


def test_npz_regression_shapes(tmp_path: Path) -> None:
    path = tmp_path / "values.npz"
    np.savez(path, x=np.zeros((2, 3, 1)), y=np.array([[1.0, 2.0], [3.0, 4.0]]))
    data = read_sequences(path, objective="regression")
    assert not data.per_step
    assert data.target_names == ["y_0", "y_1"]
    np.testing.assert_array_equal(data.targets[1], [[3.0, 4.0]])

    np.savez(path, x=np.zeros((2, 3, 1)), lengths=np.array([3, 2]), y=np.arange(12.0).reshape(2, 3, 2))
    data = read_sequences(path, objective="regression")
    assert data.per_step
    assert [t.shape for t in data.targets] == [(3, 2), (2, 2)]


def test_ts_multivariate_variable_length(tmp_path: Path) -> None:
    data = read_sequences(_write(tmp_path, "toy.ts", TOY_TS))
    np.testing.assert_array_equal(data.sequences[0], [[1, 4], [2, 5], [3, 6]])
    np.testing.assert_array_equal(data.sequences[1], [[7, 9], [8, 10]])
    assert data.feature_names == ["dim_0", "dim_1"]
    assert data.classes == ["a", "b"]  # sorted, not in @classLabel's order
    assert [t.tolist() for t in data.targets] == [[0], [1]]
    assert not data.per_step


def test_ts_regression_targets(tmp_path: Path) -> None:
    text = "@problemName R\n@timeStamps false\n@targetLabel true\n@data\n1,2:0.5\n3:-1.5\n"
    data = read_sequences(_write(tmp_path, "r.ts", text), objective="regression")
    assert data.classes is None
    assert [t.tolist() for t in data.targets] == [[[0.5]], [[-1.5]]]


_TS_HEADER = "@problemName Bad\n@timeStamps false\n@missing true\n@classLabel true a b\n@data\n"  # 5 lines

BAD_TEXT_FILES = [
    (
        "no_target.csv",
        "sequence,step,x\na,0,1\n",
        "no column 'target' (the target column); the columns are: sequence, step, x",
    ),
    (
        "text.csv",
        "sequence,step,x,target\na,0,1,u\na,1,abc,u\n",
        "line 3, column 'x': expected a finite number, got 'abc'",
    ),
    (
        "nan.csv",
        "sequence,step,x,target\na,0,nan,u\n",
        "line 2, column 'x': expected a finite number, got 'nan'",
    ),
    (
        "blank.csv",
        "sequence,step,x,target\na,0,,u\n",
        "line 2, column 'x': expected a finite number, got an empty field",
    ),
    (
        "huge.csv",
        "sequence,step,x,target\na,0,1e300,u\n",
        "line 2, column 'x': expected a finite number, got '1e300'",
    ),
    (
        "twice.csv",
        "sequence,step,x,target\na,1,0,u\nb,1,0,u\na,1,0,u\n",
        "sequence 'a' has step 1 twice (line 2 and line 4)",
    ),
    ("fields.csv", "sequence,step,x,target\na,0,1\n", "line 2: 3 fields, expected 4"),
    ("empty.csv", "", "the file is empty"),
    ("header.csv", "sequence,step,x,target\n", "no rows after the header"),
    ("ragged.ts", _TS_HEADER + "1,2:3,4:a\n1,2:3,4,5:b\n", "line 7: dimensions of lengths [2, 3]"),
    ("dims.ts", _TS_HEADER + "1,2:3,4:a\n1,2:b\n", "line 7: expected 2 dimensions, got 1"),
    ("missing.ts", _TS_HEADER + "1,?,3:a\n", "line 6: missing value '?' in dimension 0, value 2"),
    ("label.ts", _TS_HEADER + "1,2:c\n", "line 6: class label 'c' is not declared by @classLabel (a b)"),
    (
        "stamps.ts",
        "@timeStamps true\n@classLabel true a\n@data\n",
        "line 1: timestamped data (@timeStamps true) is not supported",
    ),
    ("nodata.ts", "@classLabel true a\n", "no @data line"),
    ("unlabelled.ts", "@classLabel false\n@data\n1,2\n", "line 1: @classLabel false"),
    ("table.xlsx", "a,b\n", "unknown data format '.xlsx': expected one of .csv, .parquet, .pq, .npz, .ts"),
]


@pytest.mark.parametrize(
    ("name", "text", "fragment"), BAD_TEXT_FILES, ids=[case[0] for case in BAD_TEXT_FILES]
)
def test_bad_text_files_name_the_file_and_the_place(
    tmp_path: Path, name: str, text: str, fragment: str
) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(DataFileError, match=re.escape(fragment)) as info:
        read_sequences(path)
    assert str(info.value).startswith(f"{path}: ")


def test_ts_objective_must_match_the_targets(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=r"class labels .* use the classification objective"):
        read_sequences(_write(tmp_path, "toy.ts", TOY_TS), objective="regression")


def test_parquet_null_and_fractional_labels(tmp_path: Path) -> None:
    table: dict[str, list[object]] = {
        "sequence": ["a", "a"],
        "step": [0, 1],
        "x": [1.0, None],
        "target": [0.5, 1.5],
    }
    path = _write_parquet(tmp_path / "nulls.parquet", table)
    with pytest.raises(DataFileError, match=re.escape("row 2, column 'x': no value")):
        read_sequences(path, objective="regression")
    table["x"] = [1.0, 2.0]
    path = _write_parquet(tmp_path / "fractions.parquet", table)
    with pytest.raises(
        DataFileError, match=r"column 'target' holds fractional numbers .* regression objective"
    ):
        read_sequences(path)


NPZ_MISTAKES = [
    (
        {"x": np.zeros((2, 3, 1)), "y": np.zeros(2, int), "lengths": np.array([3])},
        "array 'lengths' is int64 of shape [1]",
    ),
    (
        {"x": np.zeros((2, 3, 1)), "y": np.zeros(2, int), "lengths": np.array([3, 4])},
        "sequence 1 has length 4: expected 1 to 3",
    ),
    (
        {"x": np.zeros((2, 3, 1)), "y": np.zeros(2, int), "lengths": np.array([0, 3])},
        "sequence 0 has length 0",
    ),
    (
        {"x": np.zeros((2, 3)), "y": np.zeros(2, int)},
        "array 'x' is float64 of shape [2, 3]: expected numbers [N, T, F]",
    ),
    ({"x": np.zeros((2, 3, 1)), "y": np.zeros(3, int)}, "array 'y' has 3 rows, 'x' 2 sequences"),
    (
        {"x": np.zeros((2, 3, 1)), "y": np.zeros((2, 4), int)},
        "expected class labels (whole numbers or strings) [N] (per sequence) or [N, 3]",
    ),
    ({"x": np.zeros((2, 3, 1)), "y": np.zeros(2)}, "array 'y' is float64 of shape [2]"),
    ({"x": np.zeros((2, 3, 1))}, "no array 'y'; the archive holds: x"),
    (
        {"x": np.array([np.zeros((2, 1)), np.zeros((3, 1))], dtype=object), "y": np.zeros(2, int)},
        "array 'x' holds Python objects",
    ),
    (
        {"x": np.full((1, 2, 1), np.inf), "y": np.zeros(1, int)},
        "array 'x': sequence 0, step 0: expected finite numbers, got inf",
    ),
    (
        {"x": np.zeros((1, 2, 2)), "y": np.zeros(1, int), "feature_names": np.array(["a"])},
        "array 'feature_names'",
    ),
]


@pytest.mark.parametrize(("arrays", "fragment"), NPZ_MISTAKES, ids=[case[1][:40] for case in NPZ_MISTAKES])
def test_bad_npz_names_the_array(tmp_path: Path, arrays: dict[str, Any], fragment: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # `arrays` is Any: savez also takes allow_pickle (a bool) as a keyword
    with pytest.raises(DataFileError, match=re.escape(fragment)):
        read_sequences(path)


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=re.escape("not a NumPy .npz archive")):
        read_sequences(_write(tmp_path, "text.npz", "x,y\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no such file"):
        read_sequences(tmp_path / "absent.csv")


def test_readers_import_neither_torch_nor_pyarrow() -> None:
    """The readers run where torch is not installed; pyarrow is loaded only when a Parquet file is read."""
    probe = "import sys, training.data; print(sorted({'torch', 'pyarrow', 'sktime'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# The UEA/UCR archive's own files, as sktime ships them (found without importing sktime) ----------------


def _sktime_dataset(name: str, split: str) -> Path:
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"sktime is not installed: no {name}_{split}.ts to read")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name / f"{name}_{split}.ts"
    if not path.is_file():
        pytest.skip(f"{path} is absent from this sktime")
    return path


@pytest.mark.parametrize(
    ("split", "count", "shortest", "longest", "per_class"),
    [("TRAIN", 270, 7, 26, [30] * 9), ("TEST", 370, 7, 29, [31, 35, 88, 44, 29, 24, 40, 50, 29])],
)
def test_japanese_vowels(split: str, count: int, shortest: int, longest: int, per_class: list[int]) -> None:
    data = read_sequences(_sktime_dataset("JapaneseVowels", split))
    lengths = [len(s) for s in data.sequences]
    assert (len(data.sequences), min(lengths), max(lengths)) == (count, shortest, longest)
    assert {s.shape[1] for s in data.sequences} == {12}
    assert data.classes == [str(k) for k in range(1, 10)]
    assert np.bincount(np.concatenate(data.targets)).tolist() == per_class


@pytest.mark.parametrize("split", ["TRAIN", "TEST"])
def test_basic_motions(split: str) -> None:
    data = read_sequences(_sktime_dataset("BasicMotions", split))
    assert len(data.sequences) == 40
    assert {s.shape for s in data.sequences} == {(100, 6)}
    assert data.classes == ["Badminton", "Running", "Standing", "Walking"]
    assert np.bincount(np.concatenate(data.targets)).tolist() == [10, 10, 10, 10]


def test_japanese_vowels_first_values_as_written() -> None:
    path = _sktime_dataset("JapaneseVowels", "TRAIN")
    lines = path.read_text().splitlines()
    dimensions = lines[lines.index("@data") + 1].split(":")[:-1]  # the first case, less its label
    expected = np.array([d.split(",") for d in dimensions], dtype=np.float32).T
    np.testing.assert_array_equal(read_sequences(path).sequences[0], expected)
