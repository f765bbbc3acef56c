"""Test set-up: Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at the top.
"""
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def record_calls(monkeypatch):
    """record_calls(module, *names): from now on (for this test) each call of module.<name> appends
    its name to the list returned, the same list for every use in one test."""
    log = []

    def record(module, *names):
        for name in names:
            fn = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _f=fn, _n=name, **k: log.append(_n) or _f(*a, **k))
        return log
    return record
