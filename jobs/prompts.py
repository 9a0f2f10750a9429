"""Prompt sources: the shipped set, JSONL or Parquet on disk or in S3, a `datasets` name, or none (`synthesize`:
ingest has the teacher engine write them).

Every row needs a non-empty `prompt` string; `id` is optional. A bad row stops ingest with its file and
line (JSONL) or row number (Parquet, datasets).
"""

from __future__ import annotations

import io

from jobs.assets import builtin
from jobs.config import IngestConfig
from jobs.errors import InputError, TransientError
from jobs.inputs import MB, too_big
from jobs.store import StoreSettings, fetch_source, parse_jsonl

SYNTHESIZE = "synthesize"


def prompt_source(ingest: IngestConfig) -> str:
    """`ingest.prompts`, or when it is empty the card's own: the shipped set of a built-in card, else synthesized."""
    if ingest.prompts:
        return ingest.prompts
    return ingest.card if ingest.card.startswith("builtin:") else SYNTHESIZE


def source_bytes(ingest: IngestConfig, settings: StoreSettings) -> bytes:
    """The raw bytes behind a file source (used for the run id); `hf:` and synthesized sources have none."""
    source = prompt_source(ingest)
    if source.startswith("builtin:"):
        return builtin(source, "prompts", ".jsonl")
    if source.startswith("hf:") or source == SYNTHESIZE:
        return source.encode()
    return fetch_source(settings, source, ingest.max_input_mb)


def _check_row(row: dict, where: str) -> dict:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: missing or empty 'prompt'")
    return {"id": str(row.get("id") or ""), "prompt": prompt.strip()}


def _parquet_rows(data: bytes, where: str, max_mb: int) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        # the cap holds for the columns as they unpack, not only for the compressed file
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
        unpacked = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if unpacked > max_mb * MB:
            raise too_big(f"{where} (unpacked)", unpacked, max_mb * MB)
        # no reader threads: a prompt file is small, and pyarrow's pool can abort the interpreter at exit
        table = pq.read_table(io.BytesIO(data), use_threads=False)
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise InputError(f"{where}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    return [_check_row(row, f"{where}: row {i}") for i, row in enumerate(table.to_pylist())]


def _dataset_rows(source: str) -> list[dict]:
    """`hf:<name>[:<split>[:<column>]]` through `datasets` (needs the Hub: not reachable offline)."""
    name, split, column = (source.removeprefix("hf:").split(":") + ["train", "prompt"])[:3]
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        table = datasets.load_dataset(name, split=split)
    except DatasetsError as exc:  # no such dataset (an OSError too, so caught first)
        raise InputError(f"prompts {source}: cannot load dataset ({str(exc).splitlines()[0]})") from None
    except (ConnectionError, TimeoutError) as exc:  # the Hub did not answer: a retry may get it
        raise TransientError(f"prompts {source}: cannot load dataset ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # a missing split or config, and the like, come in several types
        raise InputError(f"prompts {source}: cannot load dataset ({str(exc).splitlines()[0]})") from None
    if column not in table.column_names:
        raise InputError(f"prompts {source}: no column {column!r} (has {', '.join(table.column_names)})")
    return [_check_row({"prompt": row[column]}, f"{source}: row {i}") for i, row in enumerate(table)]


def load_prompts(ingest: IngestConfig, settings: StoreSettings) -> list[dict]:
    source = prompt_source(ingest)
    if source.startswith("hf:"):
        rows = _dataset_rows(source)
    elif source.endswith(".parquet"):
        rows = _parquet_rows(source_bytes(ingest, settings), source, ingest.max_input_mb)
    else:
        rows = parse_jsonl(source_bytes(ingest, settings), source, check=_check_row)
    if not rows:
        raise InputError(f"prompts {source}: no prompts found")
    return rows
