"""Test set-up: Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at the top.
"""
import os

import numpy as np
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


# ------------------------------------------------------------------ tiny models and data (test_train, test_predict)
WORDS = {0: "alpha apple amber", 1: "bravo banana blue", 2: "charlie cherry cyan", 3: "delta date dune"}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """2-layer random BERT, RoBERTa-style, DistilBERT and RoFormer models, saved with the MiniLM tokenizer."""
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification,
                              RoFormerConfig, RoFormerForSequenceClassification)

    import torch

    from clear_fast.model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    small = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=80)
    paths = {}
    for name, cfg, cls in (("bert", BertConfig(**small), BertForSequenceClassification),
                           ("roberta", RobertaConfig(**small, pad_token_id=0), RobertaForSequenceClassification),
                           ("distilbert", DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2,
                                                           hidden_dim=64, max_position_embeddings=80),
                            DistilBertForSequenceClassification),
                           # its layers also return their attention probabilities (the shared-prefix pass)
                           ("roformer", RoFormerConfig(**small, embedding_size=32), RoFormerForSequenceClassification)):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        cls(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory):
    """A 4-class CSV task that a tiny model learns in a few epochs; string labels."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("toy")
    for split, n in (("train", 160), ("dev", 40), ("test", 60)):
        rows = ["text,label"]
        for i in range(n):
            y = i % 4
            words = WORDS[y].split() + ["filler", "word", "the"]
            rows.append(" ".join(rng.choice(words, size=6)) + f",class_{y}")
        (d / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return d


def cli(model, files, out, *extra):
    """Training arguments on the toy files, with the built-in datasets' default noise (symmetric 0.4)."""
    return ["--noise-type", "symmetric", "--model", model, "--train-file", str(files / "train.csv"), "--dev-file", str(files / "dev.csv"),
            "--test-file", str(files / "test.csv"), "--output-dir", str(out), "--max-length", "16",
            "--batch-size", "16", "--num-epochs", "3", "--warmup-epochs", "1", "--learning-rate", "3e-3",
            "--no-progress", "--max-train-samples", "0", *extra]
