"""The `conveyor` command line: the one part of serving/ that reaches training/ and export/ (lazily)."""
