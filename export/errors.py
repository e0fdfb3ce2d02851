"""The one exception the export stage raises; the CLI prints its message and exits non-zero."""

from __future__ import annotations


class ExportError(Exception):
    """An export failed: the message names the artifact or check and the reason, ready to print."""
