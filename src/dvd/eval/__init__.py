"""Evaluation: zero-shot classification, retrieval, captioning, VQA, POPE; all write result rows."""

from dvd.eval.results import ResultRow, format_table, read_rows, write_rows

__all__ = ["ResultRow", "format_table", "read_rows", "write_rows"]
