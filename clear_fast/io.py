"""Atomic output: every file is written to a temporary sibling and renamed into place,
so an interrupted run never leaves a half-written file behind."""
import json
import os
import shutil
import tempfile
from pathlib import Path


def _atomic(path, write, mode):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text):
    _atomic(path, lambda f: f.write(text), "w")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_jsonl(path, records):
    write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in records))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def torch_save(obj, path):
    import torch

    _atomic(path, lambda f: torch.save(obj, f), "wb")


def save_figure(fig, path):
    _atomic(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), "wb")


def replace_dir(tmp_dir, final_dir):
    """Move a fully written folder into place (the old one, if any, is removed only afterwards)."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
