"""`python -m clear_fast.predict`: a finished run's classifier on new texts (tiny random models)."""
import csv
import json

import numpy as np
import pytest
import torch

from clear_fast.config import parse_config
from clear_fast.data import read_texts
from clear_fast.predict import TrainedClassifier, main
from clear_fast.train import main as train_main
from clear_fast.trainer import Run
from conftest import WORDS, cli


@pytest.fixture(scope="module")
def trained(tiny_models, toy_files, tmp_path_factory):
    """A finished clear-lora run and a full fine-tuning run, with the Run objects that made them."""
    runs = {}
    for method in ("clear-lora", "full"):
        out = tmp_path_factory.mktemp(method)
        run = Run(parse_config(cli(tiny_models["bert"], toy_files, out, "--method", method, "--no-plots")))
        run.run()
        runs[method] = (out, run)
    return runs


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["clear-lora", "full"])
def test_predictions_are_the_runs_own(trained, toy_files, tmp_path, method, capsys):
    out, run = trained[method]
    batch = run.test.batch(np.arange(len(run.test)), "cpu")
    run.model.eval()
    run._route(None)  # every adapter on, as the run evaluates
    with torch.no_grad():
        want = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)

    texts, _, _ = read_texts(toy_files / "test.csv")
    clf = TrainedClassifier.from_run(out, device="cpu")
    got = clf.predict_proba(texts, batch_size=7)  # batches sorted by length, put back in order
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert clf.label_names == run.label_names

    dest = tmp_path / "pred.csv"
    assert main([str(out), str(toy_files / "test.csv"), "--output", str(dest), "--no-progress"]) == 0
    rows = read_rows(dest)
    assert [r["text"] for r in rows] == texts and rows[0]["row"] == "1"
    assert [r["predicted_label"] for r in rows] == [run.label_names[k] for k in want.argmax(-1)]
    results = json.loads((out / "results.json").read_text())
    agree = sum(r["agrees"] == "1" for r in rows)
    assert agree / len(rows) == pytest.approx(results["last_test_accuracy"])
    printed = capsys.readouterr().out
    assert f"{agree} of {len(rows)} agree" in printed
    assert f"with the model of epoch {results['model_epoch']}, the last:" in printed
    given = np.array([float(r["given_label_probability"]) for r in rows])
    ids = [run.label_names.index(r["given_label"]) for r in rows]
    np.testing.assert_allclose(given, got[np.arange(len(rows)), ids], rtol=1e-5)


def test_text_files_probabilities_and_the_adapter_folder_itself(trained, tmp_path):
    out, _ = trained["clear-lora"]
    src = tmp_path / "new.txt"
    src.write_text(f"{WORDS[2]}\u2028more\x0cstill line 1\r\n\n{WORDS[0]} filler\n")  # only newlines split
    assert main([str(out / "adapter"), str(src), "--all-probabilities", "--no-progress"]) == 0
    rows = read_rows(tmp_path / "new.predictions.csv")  # the default output: beside the input
    assert [r["row"] for r in rows] == ["1", "3"] and "given_label" not in rows[0]  # line numbers
    probs = np.array([[float(r[f"p_class_{k}"]) for k in range(4)] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert [r["predicted_label"] for r in rows] == [f"class_{k}" for k in probs.argmax(1)]
    assert main([str(out), str(src), "--no-progress"]) == 2, "an existing output is not replaced"
    assert main([str(out), str(src), "--no-progress", "--overwrite"]) == 0


def test_given_labels_unknown_or_missing(trained, tmp_path, capsys):
    out, run = trained["clear-lora"]
    src = tmp_path / "new.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"sentence": WORDS[1], "intent": "class_1"}, {"sentence": WORDS[1], "intent": "no_such_class"},
        {"sentence": WORDS[3]}]) + "\n")
    assert main([str(out), str(src), "--text-column", "sentence", "--label-column", "intent", "--no-progress"]) == 0
    rows = read_rows(tmp_path / "new.predictions.csv")
    assert [r["given_label"] for r in rows] == ["class_1", "no_such_class", ""]
    assert rows[1]["agrees"] == "0" and rows[1]["given_label_probability"] == ""
    assert rows[2]["agrees"] == "" and rows[2]["given_label_probability"] == ""
    captured = capsys.readouterr()
    assert "warning: 1 given label(s) are not among the 4 labels" in captured.err
    assert " of 2 agree" in captured.out  # the row without a label is not counted


@pytest.mark.parametrize("case, message", [
    ("no_run", "run folder not found"),
    ("unfinished", "has not finished"),
    ("no_input", "data file not found"),
    ("no_text_column", "no column 'sentence'"),
    ("txt_with_labels", "no labels"),
    ("output_is_input", "is the input file"),
    ("bad_max_length", "--max-length must be at least 2"),
    ("bad_device", "unknown device 'tpu'"),
    ("bad_batch_size", "--batch-size must be at least 1"),
    ("output_is_a_folder", "is a folder: name a file"),
    ("input_is_a_folder", "is a folder"),
    ("output_under_a_file", "is a file, not a folder"),
])
def test_mistakes_are_one_clear_message(trained, toy_files, tmp_path, capsys, case, message):
    out, _ = trained["clear-lora"]
    test_csv, txt = str(toy_files / "test.csv"), tmp_path / "t.txt"
    txt.write_text("hello\n")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"")
    argv = {"no_run": [str(tmp_path / "nope"), test_csv],
            "unfinished": [str(unfinished), test_csv],
            "no_input": [str(out), str(tmp_path / "missing.csv")],
            "no_text_column": [str(out), test_csv, "--text-column", "sentence"],
            "txt_with_labels": [str(out), str(txt), "--label-column", "label"],
            "output_is_input": [str(out), test_csv, "--output", test_csv, "--overwrite"],
            "bad_max_length": [str(out), test_csv, "--max-length", "0", "--output", str(tmp_path / "p.csv")],
            "bad_device": [str(out), test_csv, "--device", "tpu", "--output", str(tmp_path / "p.csv")],
            "bad_batch_size": [str(out), test_csv, "--batch-size", "0", "--output", str(tmp_path / "p.csv")],
            "output_is_a_folder": [str(out), test_csv, "--output", str(unfinished), "--overwrite"],
            "input_is_a_folder": [str(out), str(unfinished), "--output", str(tmp_path / "p.csv")],
            "output_under_a_file": [str(out), test_csv, "--output", str(txt / "p.csv")]}[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv + ["--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a failed call writes nothing"


def test_python_api_refuses_what_is_not_a_list_of_texts(trained):
    clf = TrainedClassifier.from_run(trained["clear-lora"][0], device="cpu")
    with pytest.raises(TypeError, match="not one string"):
        clf.predict_proba("one text")
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        clf.predict_proba(["a", 3])
    assert clf.predict([WORDS[0], WORDS[3]]) == [clf.label_names[k] for k in
                                                clf.predict_proba([WORDS[0], WORDS[3]]).argmax(-1)]


def test_columns_default_to_the_runs_and_long_texts_are_cut_to_the_model(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["clear-lora"][0], run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "text_column": "sentence", "label_column": "intent"}))
    src = tmp_path / "new.tsv"
    src.write_text(f"sentence\tintent\n{WORDS[1]}\tclass_1\n{' '.join([WORDS[0]] * 100)}\tclass_0\n")
    # 300+ tokens, --max-length 600: the tiny model has 80 positions
    assert main([str(run), str(src), "--max-length", "600", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning: --max-length 600 is more than this model takes: texts are cut at 80 tokens" in captured.err
    assert " of 2 agree" in captured.out
    rows = read_rows(tmp_path / "new.predictions.csv")
    assert [r["given_label"] for r in rows] == ["class_1", "class_0"]
    src.write_text(f"sentence\n{WORDS[1]}\n")  # no labels: said, not an error
    assert main([str(run), str(src), "--no-progress", "--overwrite"]) == 0
    assert "no column 'intent'" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_keep_model_best_dev_saves_the_dev_selected_epochs_model(tiny_models, toy_files, tmp_path, method,
                                                                 monkeypatch, capsys):
    # The dev accuracies the run sees peak at epoch 3 of 4 (the tiny model's own rise to the last epoch).
    real_dev, seen = [], iter([0.1, 0.2, 0.9, 0.3])
    evaluate = Run.evaluate

    def evaluate_with_a_peak(self, split):
        acc = evaluate(self, split)
        if split is not None and split is self.dev:
            real_dev.append(acc)
            return next(seen)
        return acc
    monkeypatch.setattr(Run, "evaluate", evaluate_with_a_peak)
    out = tmp_path / "run"
    args = cli(tiny_models["bert"], toy_files, out, "--method", method, "--num-epochs", "4", "--no-plots",
               "--keep-model", "best-dev", "--learning-rate", "3e-2" if method == "lora" else "1e-3")
    assert train_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model_epoch"] == results["dev_selected_epoch"] == 3
    assert real_dev[2] != real_dev[3], "the test needs epochs 3 and 4 to differ on dev"
    texts, labels, _ = read_texts(toy_files / "dev.csv")
    clf = TrainedClassifier.from_run(out, device="cpu")
    assert clf.epoch == 3
    saved = np.mean([p == y for p, y in zip(clf.predict(texts), labels)])
    assert saved == pytest.approx(real_dev[2]), "the saved model must be epoch 3's, not the last"
    assert main([str(out), str(toy_files / "dev.csv"), "--output", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    assert "with the model of epoch 3, the best on dev:" in capsys.readouterr().out


def test_keep_model_best_dev_needs_a_dev_split_and_a_saved_model(tiny_models, toy_files, tmp_path, capsys):
    no_dev = [a for a in cli(tiny_models["bert"], toy_files, tmp_path / "a", "--keep-model", "best-dev")]
    i = no_dev.index("--dev-file")
    del no_dev[i:i + 2]
    assert train_main(no_dev) == 2
    assert "--keep-model best-dev needs a dev split" in capsys.readouterr().err
    assert not (tmp_path / "a").exists(), "a failed start writes nothing"
    assert train_main(cli(tiny_models["bert"], toy_files, tmp_path / "b", "--keep-model", "best-dev",
                          "--no-save-adapter")) == 2
    assert "keeps nothing" in capsys.readouterr().err


def test_a_model_of_ones_own_predicts_with_every_adapter_on(tiny_models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from clear_fast import inject_routed_lora

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=4,
                                                               ignore_mismatched_sizes=True)
    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    router = inject_routed_lora(model)
    for layer in router.modules():
        torch.nn.init.normal_(layer.lora_B)  # adapters that change the output
    texts = [WORDS[0], WORDS[1]]
    with pytest.raises(ValueError, match="the model has 4 classes, label_names 3 names"):
        TrainedClassifier(model, tok, ["a", "b", "c"], 16)
    for bad, message in ((-5, "max_length must be an integer >= 2"), (1, "max_length must be an integer >= 2"),
                         (16.0, "max_length must be an integer"), (1000, "more than this model takes \\(80 tokens\\)")):
        with pytest.raises(ValueError, match=message):
            TrainedClassifier(model, tok, list("abcd"), bad)
    router.route(torch.tensor([0.0, 0.0]))  # a mask a training step left behind
    clf = TrainedClassifier(model, tok, list("abcd"), 16)  # device "auto"
    got = clf.predict_proba(texts)
    router.route(torch.tensor([0.0, 0.0, 0.0]))  # one set after the classifier was made
    np.testing.assert_array_equal(clf.predict_proba(texts), got)  # every adapter on, whatever the masks
    assert all(torch.equal(m.routing_mask, torch.zeros(3)) for m in router.modules()), "masks put back"
    router.route(None)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).logits.softmax(-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_saved_adapter_keeps_the_structure_it_was_trained_with(tiny_models, tmp_path):
    """A model loaded with overrides (one layer of the checkpoint's two) reloads with them, not as the
    checkpoint's own structure; a base_model that is not the model's checkpoint is refused."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from clear_fast import inject_routed_lora, save_adapter

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2,
                                                               num_hidden_layers=1).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    router = inject_routed_lora(model)
    for layer in router.modules():
        torch.nn.init.normal_(layer.lora_B, std=5.0)
    with pytest.raises(ValueError, match="does not hold this model's weights"):
        save_adapter(model, router, tmp_path / "wrong", ["a", "b"], base_model=tiny_models["roberta"], max_length=16)
    torch.manual_seed(1)  # the same architecture, other weights
    AutoModelForSequenceClassification.from_config(model.config).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="is not the one this model was built from"):
        save_adapter(model, router, tmp_path / "wrong2", ["a", "b"], base_model=str(tmp_path / "other"), max_length=16)
    save_adapter(model, router, tmp_path / "run", ["a", "b"], max_length=16)
    clf = TrainedClassifier.from_run(tmp_path / "run", device="cpu")
    assert clf.model.config.num_hidden_layers == 1
    texts = [WORDS[0], WORDS[2]]
    with torch.no_grad():
        want = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()
    np.testing.assert_allclose(clf.predict_proba(texts), want, atol=1e-6)
    # a bf16 model holds the checkpoint's weights rounded: the same checkpoint, not refused
    half = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2, dtype=torch.bfloat16)
    save_adapter(half, inject_routed_lora(half), tmp_path / "bf16", ["a", "b"], max_length=16)


def test_a_run_trained_on_a_relative_model_path_predicts_from_anywhere(tiny_models, toy_files, tmp_path, monkeypatch):
    """The base model's folder is recorded as an absolute path: a run made with --model models/bert
    loads from another working directory."""
    import os
    import shutil

    shutil.copytree(tiny_models["bert"], tmp_path / "models" / "bert")
    monkeypatch.chdir(tmp_path)
    train_main(cli(os.path.join("models", "bert"), toy_files, tmp_path / "rel", "--method", "lora", "--num-epochs", "1",
             "--no-plots"))
    labels = json.loads((tmp_path / "rel" / "adapter" / "labels.json").read_text())
    assert labels["base_model"] == str(tmp_path / "models" / "bert")
    monkeypatch.chdir(toy_files)
    clf = TrainedClassifier.from_run(tmp_path / "rel", device="cpu")
    assert clf.predict_proba([WORDS[0]]).shape == (1, 4)


def test_backbone_weights_the_checkpoint_lacks_are_saved_with_the_adapter(tmp_path):
    """A masked-LM checkpoint has no pooler: loading draws one at random, on every load. It is saved
    with the adapter (as the head is), so the reloaded classifier is the trained one, and the save does
    not take the random pooler for another base model."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

    from clear_fast import inject_routed_lora, save_adapter
    from clear_fast.model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "mlm", num_labels=2).eval()
    router = inject_routed_lora(model)
    for layer in router.modules():
        torch.nn.init.normal_(layer.lora_B, std=3.0)
    torch.nn.init.normal_(model.classifier.weight, std=5.0)
    save_adapter(model, router, tmp_path / "run", ["a", "b"], max_length=16)
    assert "bert.pooler.dense" in json.loads((tmp_path / "run" / "adapter_config.json").read_text())["modules_to_save"]
    texts = [WORDS[0], WORDS[3]]
    with torch.no_grad():
        want = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()
    got = TrainedClassifier.from_run(tmp_path / "run", device="cpu").predict_proba(texts)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
