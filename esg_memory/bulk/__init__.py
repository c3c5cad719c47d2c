"""Edits in bulk: import files of edits (JSONL or the benchmark formats) atomically, export a memory.

================  ==========================================================================
`formats`         files and lists of records -> checked `EditRecord`s (every image decoded)
`apply`           `apply_batch`: the records as one atomic write (one journal record)
`export`          `export_memory`: a memory as the JSONL import format + its pictures
================  ==========================================================================

``esg-memory import`` / ``export`` and the service's ``POST /edits:batch`` are thin shells over these.
"""

from .apply import BatchResult, apply_batch
from .export import ExportResult, export_memory
from .formats import FORMATS, BulkRecordError, EditRecord, parse_items, parse_jsonl, read_file

__all__ = [
    "FORMATS",
    "BatchResult",
    "BulkRecordError",
    "EditRecord",
    "ExportResult",
    "apply_batch",
    "export_memory",
    "parse_items",
    "parse_jsonl",
    "read_file",
]
