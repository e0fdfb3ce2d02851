"""A user's sequences read from a data file (CSV, Parquet, NumPy .npz, UEA/UCR .ts) for `conveyor train`."""

from training.data.readers import Columns, DataFileError, Objective, SequenceData, read_sequences

__all__ = ["Columns", "DataFileError", "Objective", "SequenceData", "read_sequences"]
