"""Prompts with verifiable answers: generated arithmetic word problems, GSM8K and MATH formats.

GSM8K format: {"question": str, "answer": "... #### n"}; MATH format: {"problem": str,
"solution": "... \\boxed{x} ..."}. Local JSONL or Parquet files, or a `datasets` hub name
where the network allows. Every loader returns a list of Example; a malformed row raises
DataError naming the file, the row and the problem (one line).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from sim.config import ConfigError

PROMPT_TEMPLATE = "Q: {question}\nA:"


class DataError(ConfigError):
    """A data source that cannot be used. str(e) is one line."""


@dataclass(frozen=True)
class Example:
    question: str
    answer: str   # the reference: a GSM8K answer ("... #### n") or a MATH solution (with \boxed{})
    kind: str     # "gsm8k" (also the arithmetic generator) or "math"

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(question=self.question)


NAMES = ("Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Ines", "Kofi")
ITEMS = ("apples", "books", "coins", "pens", "cards", "shells")


def arithmetic_example(rng: random.Random, difficulty: int = 1) -> Example:
    """One word problem in GSM8K format. difficulty 1: a + b (a, b < 10); 2: a + b - c
    (two steps, result >= 0); 3: a * b + c. Answer text: "#### n"."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if difficulty <= 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q, n = f"{name} has {a} {item} and gets {b} more. How many {item} now?", a + b
    elif difficulty == 2:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        c = rng.randint(0, a + b)
        q, n = f"{name} has {a} {item}, gets {b} more and gives away {c}. How many {item} now?", a + b - c
    else:
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(0, 9)
        q, n = f"{name} buys {a} boxes of {b} {item} and finds {c} more. How many {item} now?", a * b + c
    return Example(q, f"#### {n}", "gsm8k")


def arithmetic_examples(n: int, difficulty: int = 1, seed: int = 0) -> list[Example]:
    rng = random.Random(f"arith-{difficulty}-{seed}")
    return [arithmetic_example(rng, difficulty) for _ in range(n)]


#: Longest JSONL line read (bytes): a data row is a problem and its solution, not megabytes.
MAX_LINE_BYTES = 1 << 20


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached now (False under HF_HUB_OFFLINE=1): checked
    before a hub download, so that an offline machine gets one line at once instead of minutes of
    retries."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _rows(path: Path):
    """(line or row number, row dict) of a JSONL or Parquet file; DataError naming the file and
    the line for a missing file, a directory, bytes that are not UTF-8, a line longer than
    MAX_LINE_BYTES, bad JSON or a row that is not an object."""
    if not path.exists():
        raise DataError(f"data: no such file {path}")
    if not path.is_file():
        raise DataError(f"data: {path} is not a file")
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            yield from enumerate(pd.read_parquet(path.absolute()).to_dict("records"), 1)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"data: {path}: unreadable parquet ({type(e).__name__})") from None
        return
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"data: cannot read {path}: {e.strerror or e}") from None
    with f:
        i = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            i += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"data: {path} line {i}: longer than {MAX_LINE_BYTES:,} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"data: {path} line {i}: not UTF-8 (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise DataError(f"data: {path} line {i}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
            if not isinstance(row, dict):
                raise DataError(f"data: {path} line {i}: expected a JSON object")
            yield i, row


def _field(row: dict, key: str, path, i) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"data: {path} row {i}: missing or empty string field '{key}'")
    return v


#: per format: (question field, reference field, required marker, hub config, what the marker is)
FORMATS = {"gsm8k": ("question", "answer", "####", "main", "'#### n' final answer"),
           "math": ("problem", "solution", "\\boxed", None, "\\boxed{} answer")}


def load_examples(kind: str, source: str) -> list[Example]:
    """Rows of format ``kind`` (FORMATS) from a JSONL/Parquet file or a `datasets` hub name."""
    q_key, a_key, marker, hub_config, what = FORMATS[kind]
    path = Path(source)
    local = path.suffix in (".jsonl", ".json", ".parquet") or path.exists()
    out = []
    for i, row in (_rows(path) if local else _hub(source, hub_config)):
        q, a = _field(row, q_key, source, i), _field(row, a_key, source, i)
        if marker not in a:
            raise DataError(f"data: {source} row {i}: {a_key} has no {what}")
        out.append(Example(q, a, kind))
    if not out:
        raise DataError(f"data: {source}: no rows")
    return out


def load_gsm8k(source: str) -> list[Example]:
    """GSM8K-format rows (question, answer with '#### n')."""
    return load_examples("gsm8k", source)


def load_math(source: str) -> list[Example]:
    """MATH-format rows (problem, solution with \\boxed{})."""
    return load_examples("math", source)


def _hub(name: str, config: str | None):
    if not hub_reachable():
        raise DataError(f"data: {name!r} is not a local file, and the Hugging Face hub cannot be reached")
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split="train") if config else datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, ...: one line
        raise DataError(f"data: cannot load hub dataset {name!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    yield from enumerate(ds, 1)


def load_data(spec: str, n_arith: int = 2000, difficulty: int = 1, seed: int = 0) -> list[Example]:
    """'arith' (generated), 'gsm8k:PATH_OR_NAME' or 'math:PATH_OR_NAME'."""
    if spec == "arith":
        return arithmetic_examples(n_arith, difficulty, seed)
    kind, _, src = spec.partition(":")
    if kind == "gsm8k" and src:
        return load_gsm8k(src)
    if kind == "math" and src:
        return load_math(src)
    raise DataError(f"data: expected 'arith', 'gsm8k:PATH' or 'math:PATH', got {spec!r}")
