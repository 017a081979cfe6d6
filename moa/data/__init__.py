"""Culture-labelled training data: the row schema, its loader and tokenization, and the bundled norms.

Schema and formats are documented in docs/data.md.
"""
from moa.data.schema import (CULTURES, LABELS, OPTIONAL_FIELDS, REQUIRED_FIELDS, SPLITS, TASKS, DataError,
                             load_jsonl, row_problems, write_jsonl)
from moa.data.tokenize import IGNORE_INDEX, PLAIN_PROMPT, encode_example, encode_prompt, format_prompt, padding_id

__all__ = ["CULTURES", "TASKS", "LABELS", "SPLITS", "REQUIRED_FIELDS", "OPTIONAL_FIELDS", "DataError", "load_jsonl",
           "row_problems", "write_jsonl", "encode_example", "encode_prompt", "format_prompt", "padding_id", "IGNORE_INDEX",
           "PLAIN_PROMPT"]
