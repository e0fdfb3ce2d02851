"""The UEA/UCR `.ts` text format (timeseriesclassification.com, sktime): header, then one case a line.

A header of `@` tags (case-insensitive: the archive's own files spell them both ways) and comments (`#`,
or `%` as in the archive's UnitTest files), then after `@data` one case per line: its dimensions separated
by `:`, the values of a dimension by `,`, and the class label (or the regression target) as the last `:`
field. The parser knows lines, not files: it raises `TsFormatError` with the 1-based line, and the reader
that opened the file names the file. The table readers share its number checks: it imports no reader, so
every reader can import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

MISSING = "?"
COMMENT_MARKS = ("#", "%")


class TsFormatError(ValueError):
    """A line of a .ts text that breaks the format, or asks for what is not supported."""

    def __init__(self, line: int | None, reason: str) -> None:
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.line, self.reason = line, reason


def finite_floats(
    values: Sequence[str] | np.ndarray, dtype: type[np.float32] | type[np.float64] = np.float32
) -> np.ndarray | None:
    """`values` (text or numbers) as `dtype` in one vectorized pass, or None where one is not a finite
    number of that type: the caller then finds which with `is_finite_float`, only on that failing path."""
    try:
        numbers = np.asarray(values).astype(np.float64)
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(numbers).all() and (np.abs(numbers) <= np.finfo(dtype).max).all()):
        return None
    return numbers.astype(dtype)


def is_finite_float(value: object, dtype: type[np.float32] | type[np.float64] = np.float32) -> bool:
    """Whether `value` reads as a number that `dtype` holds finitely (nan does not, nor 1e300 float32)."""
    try:
        number = float(str(value))  # str first: a table's cell may be text, a numpy number or None
    except ValueError:
        return False
    return math.isfinite(number) and abs(number) <= float(np.finfo(dtype).max)


@dataclass(frozen=True)
class TsCases:
    """The cases of a .ts text, in file order."""

    series: list[np.ndarray]  # float32 [T_i, F] each
    labels: list[str]  # each case's last field: a declared class label, or a regression target as text
    classes: list[str] | None  # the declared class labels, sorted; None where targets are regression values


@dataclass
class _Header:
    """What the `@` tags declared, filled in as they are read."""

    class_labels: list[str] | None = None
    regression: bool = False
    dimensions: int | None = None  # where @dimensions is absent, the first case's count
    series_length: int | None = None
    equal_length: bool = False


def parse_ts(lines: Iterable[str]) -> TsCases:
    """The cases of the lines of a .ts text; anything the format does not allow raises TsFormatError."""
    header = _Header()
    series: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith(COMMENT_MARKS):
            continue
        if in_data:
            values, label = _case(line, number, header)
            series.append(values)
            labels.append(label)
        elif line.startswith("@"):
            in_data = _read_tag(line, number, header)
        else:
            raise TsFormatError(number, f"expected an @ tag or a # comment before @data, got {line[:40]!r}")
    if not in_data:
        raise TsFormatError(None, "no @data line: expected the header to end with @data, then the cases")
    if not series:
        raise TsFormatError(None, "no cases after @data")
    classes = None if header.class_labels is None else sorted(set(header.class_labels))
    return TsCases(series, labels, classes)


def _read_tag(line: str, number: int, header: _Header) -> bool:
    """Record one `@` tag in `header`; True where it is `@data`, the header's end."""
    tag, *words = line.split()
    tag = tag.lower()
    if tag == "@data":
        if header.class_labels is None and not header.regression:
            raise TsFormatError(number, "expected @classLabel true ... or @targetLabel true before @data")
        return True
    if tag == "@timestamps" and _flag(words, number, tag):
        raise TsFormatError(number, "timestamped data (@timeStamps true) is not supported")
    if tag == "@classlabel":
        header.class_labels = _class_labels(words, number)
    elif tag == "@targetlabel":
        header.regression = _flag(words, number, tag)
        if not header.regression:
            raise TsFormatError(number, "@targetLabel false: the cases have no targets to train on")
    elif tag == "@dimensions":
        header.dimensions = _count(words, number, tag)
    elif tag == "@serieslength":
        header.series_length = _count(words, number, tag)
    elif tag == "@equallength":
        header.equal_length = _flag(words, number, tag)
    return False  # @problemName, @missing, @univariate and unknown tags change nothing read here


def _flag(words: list[str], number: int, tag: str) -> bool:
    if not words or words[0].lower() not in ("true", "false"):
        raise TsFormatError(number, f"expected {tag} true or {tag} false")
    return words[0].lower() == "true"


def _count(words: list[str], number: int, tag: str) -> int:
    if len(words) != 1 or not words[0].isdigit() or int(words[0]) < 1:
        raise TsFormatError(number, f"expected {tag} followed by a whole number of at least 1")
    return int(words[0])


def _class_labels(words: list[str], number: int) -> list[str]:
    if not _flag(words, number, "@classLabel"):
        raise TsFormatError(number, "@classLabel false: the cases have no class labels to train on")
    if len(words) < 2:
        raise TsFormatError(number, "expected the class labels after @classLabel true")
    return words[1:]


def _case(line: str, number: int, header: _Header) -> tuple[np.ndarray, str]:
    """One case: its values [T, F] and its label."""
    *dimensions, label = (part.strip() for part in line.split(":"))
    if not dimensions:
        raise TsFormatError(number, "expected dimensions then the target, separated by ':'")
    if header.dimensions is None:
        header.dimensions = len(dimensions)  # every later case must match the first
    if len(dimensions) != header.dimensions:
        raise TsFormatError(number, f"expected {header.dimensions} dimensions, got {len(dimensions)}")
    columns = [_dimension(text, number, index) for index, text in enumerate(dimensions)]
    lengths = sorted({len(column) for column in columns})
    if len(lengths) > 1:
        raise TsFormatError(
            number, f"dimensions of lengths {lengths}: every dimension of a case must have the same length"
        )
    if header.equal_length and header.series_length and lengths[0] != header.series_length:
        raise TsFormatError(number, f"series of length {lengths[0]}, the header says {header.series_length}")
    _check_label(label, number, header)
    return np.stack(columns, axis=1), label


def _dimension(text: str, number: int, index: int) -> np.ndarray:
    """The values of one dimension as float32; a missing, non-numeric or non-finite value names itself."""
    tokens = text.split(",")
    values = finite_floats(tokens)
    if values is not None:
        return values
    position, token = next((i, t.strip()) for i, t in enumerate(tokens) if not is_finite_float(t))
    if token == MISSING:
        raise TsFormatError(
            number,
            f"missing value '?' in dimension {index}, value {position + 1}: missing values are not "
            "supported (the reader does not impute)",
        )
    raise TsFormatError(
        number, f"dimension {index}, value {position + 1}: expected a finite number, got {token!r}"
    )


def _check_label(label: str, number: int, header: _Header) -> None:
    if header.class_labels is not None:
        if label not in header.class_labels:
            raise TsFormatError(
                number,
                f"class label {label!r} is not declared by @classLabel ({' '.join(header.class_labels)})",
            )
        return
    if not is_finite_float(label):
        raise TsFormatError(number, f"expected a finite number as the regression target, got {label!r}")
