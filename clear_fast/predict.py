"""`python -m clear_fast.predict RUN INPUT`: a finished run's classifier on new texts.

Loads what `python -m clear_fast.train` saved in RUN (the adapter and head in peft's format, or the
fine-tuned model of --method full) and writes one CSV row per text: the predicted label and its
probability and, where the input has labels, the probability the model gives the given label and
whether the two agree (sort by that probability to see the likeliest label errors first).
Every adapter is on, as in the run's default evaluation (--eval-routing all-on).

From Python: ``TrainedClassifier.from_run(RUN).predict_proba(texts)``.
"""
import argparse
import csv
import io as _io
import json
import numbers
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from . import io
from .config import DEVICES, UserError, version_string
from .data import read_texts


class TrainedClassifier:
    """A trained run's classifier: texts in, class probabilities out (label_names[k] is class k)."""

    def __init__(self, model, tokenizer, label_names, max_length, device="auto", epoch=None):
        """A model of one's own: a sequence classifier of len(label_names) classes, its tokenizer and
        the tokens per text. Routed LoRA layers in it run with every adapter on."""
        from .lora import RoutedLoRALinear
        from .model import text_length_limit
        from .trainer import _pick_device

        classes = getattr(getattr(model, "config", None), "num_labels", None)
        if classes is not None and classes != len(label_names):
            raise ValueError(f"the model has {classes} classes, label_names {len(label_names)} names")
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (tokens per text, with the special "
                             f"tokens), got {max_length!r}")
        max_length = int(max_length)
        limit = text_length_limit(model, tokenizer)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length {max_length} is more than this model takes ({limit} tokens): longer "
                             "texts would fail inside its forward")
        device = _pick_device(_checked_device(device))
        self._routed = [m for m in model.modules() if isinstance(m, RoutedLoRALinear)]
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.label_names, self.max_length, self.device = list(label_names), max_length, device
        self.epoch = epoch  # the training epoch after which the model was saved (None: not recorded)

    @classmethod
    def from_run(cls, run_dir, device="auto", max_length=None):
        """RUN: the --output-dir of a finished training run (or its adapter/ or model/ folder).
        max_length: tokens per text; by default the one it was saved with (labels.json; older runs: the
        run's config.json)."""
        from .model import (load_classifier, mark_shared_inputs, quiet_transformers, resolve_model_path,
                            saved_classifier_config, usable_max_length)

        saved, config = _saved_classifier(Path(run_dir))
        labels = json.loads((saved / "labels.json").read_text())
        if config and not (saved.parent / "results.json").exists():  # a best-dev run stopped midway
            warnings.warn(f"the run in {saved.parent} has not finished: its {saved.name}/ is from epoch "
                          f"{labels.get('epoch')}, the best on dev so far", UserWarning, stacklevel=2)
        names = labels["label_names"]
        # the base model's path as trained; on another machine the name it was given resolves again
        base = labels["base_model"]
        if not os.path.isdir(base) and config.get("model"):
            base = resolve_model_path(config["model"])
        if max_length is None:
            max_length = labels.get("max_length") or config.get("max_length")
            if max_length is None:
                raise UserError(f"{saved}: neither its labels.json nor a run's config.json beside it gives the "
                                "maximum text length: give max_length (--max-length)")
        if max_length < 2:
            raise UserError(f"--max-length must be at least 2 (tokens per text, with the special tokens), got {max_length}")
        _checked_device(device)  # before the model loads
        if (saved / "adapter_config.json").is_file():
            from peft import PeftModel

            model, tokenizer, _ = load_classifier(base, len(names), names, saved_classifier_config(saved))
            max_length = usable_max_length(max_length, model, tokenizer)  # before peft wraps its embeddings
            with quiet_transformers():
                model = PeftModel.from_pretrained(model, str(saved))
            mark_shared_inputs(model)  # DeBERTa-v2/v3's position projections frozen, as in training
        else:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            try:
                with quiet_transformers():
                    model = AutoModelForSequenceClassification.from_pretrained(str(saved))
                    # model/ holds its tokenizer since full fine-tuning saves it; older runs' is the base's
                    own = (saved / "tokenizer_config.json").is_file()
                    tokenizer = AutoTokenizer.from_pretrained(str(saved) if own else base)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load the fine-tuned model in {saved} (tokenizer from {base}): {e}") from None
            max_length = usable_max_length(max_length, model, tokenizer)
        return cls(model, tokenizer, names, max_length, device, labels.get("epoch"))

    @torch.inference_mode()
    def predict_proba(self, texts, batch_size=128, progress=False):
        """[len(texts), classes] float32 numpy array of class probabilities."""
        from tqdm.auto import tqdm

        from .trainer import Tokenized

        texts = _checked(texts)
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        data = Tokenized.from_texts(self.tokenizer, texts, np.zeros(len(texts), dtype=np.int64), self.max_length)
        out = torch.empty(len(texts), len(self.label_names))
        batches = data.sorted_batches(batch_size, self.device)  # by length: little padding
        masks = [m.routing_mask for m in self._routed]  # a training step's, put back afterwards
        try:
            for m in self._routed:
                m.routing_mask = None  # every adapter on
            for batch in tqdm(batches, total=-(-len(texts) // batch_size), desc="predict", leave=False,
                              disable=not progress):
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                out[batch["index"].cpu()] = logits.float().softmax(-1).cpu()
        finally:
            for m, mask in zip(self._routed, masks):
                m.routing_mask = mask
        return out.numpy()

    def predict(self, texts, batch_size=128):
        """The predicted label name of each text."""
        return [self.label_names[k] for k in self.predict_proba(texts, batch_size).argmax(-1)]


def _checked_device(device):
    if not DEVICES.fullmatch(str(device)):
        raise UserError(f"unknown device {device!r}: auto, cpu, cuda or cuda:N")
    return str(device)


def _checked(texts):
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string (wrap it in a list)")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts must be strings; texts[{bad}] is a {type(texts[bad]).__name__}")
    if not texts:
        raise ValueError("no texts to predict")
    return texts


def _saved_classifier(run_dir):
    """(the folder holding the trained classifier, the run's configuration or {})."""
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if (run_dir / "labels.json").is_file():  # the adapter/ or model/ folder itself
        saved, config_file = run_dir, run_dir.parent / "config.json"
    else:
        saved = next((run_dir / d for d in ("adapter", "model") if (run_dir / d / "labels.json").is_file()), None)
        config_file = run_dir / "config.json"
        if saved is None:
            if (run_dir / "checkpoint.pt").exists() and not (run_dir / "results.json").exists():
                why = "its run has not finished: continue it with its training command plus --resume"
            elif (run_dir / "results.json").exists():
                why = "its run was made with --no-save-adapter"
            else:
                why = "name the --output-dir of a finished `python -m clear_fast.train` run"
            raise UserError(f"{run_dir} holds no trained classifier (adapter/ or model/ with labels.json): {why}")
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if not isinstance(config, dict) or not {"method", "model", "max_length"} <= config.keys():  # not a run's
        config = {}
    return saved, config


# ----------------------------------------------------------------------------- the command line
def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m clear_fast.predict",
        description="Predict labels of new texts with a run of python -m clear_fast.train; where the input "
                    "has labels, also how likely the model finds each given label (low: a likely label error).")
    p.add_argument("--version", action="version", version=version_string())
    p.add_argument("run", help="the --output-dir of a finished training run (or its adapter/ or model/ folder)")
    p.add_argument("input", help="CSV, TSV or JSON-lines file with a text column (and optionally labels), "
                                 "or a .txt file with one text per line")
    p.add_argument("--output", help="CSV to write (default: INPUT's name with .predictions.csv, beside it)")
    p.add_argument("--text-column", help="text column of INPUT (default: the run's --text-column)")
    p.add_argument("--label-column", help="column of given labels to check (default: the run's --label-column, "
                                          "if INPUT has it)")
    p.add_argument("--all-probabilities", action="store_true", help="also one p_<label> column per class")
    p.add_argument("--batch-size", type=int, default=128, help="texts per forward pass (default: 128)")
    p.add_argument("--max-length", type=int, help="maximum tokens per text (default: the run's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar (default: on)")
    return p


def main(argv=None):
    from .train import _one_line_for_ours  # importing it sets the CLI's offline defaults, as for training

    with warnings.catch_warnings():
        warnings.showwarning = _one_line_for_ours(warnings.showwarning)
        try:
            return _main(build_parser().parse_args(argv))
        except (ValueError, OSError) as e:  # UserError, missing files, an output that cannot be written
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted: nothing was written", file=sys.stderr)
            return 130


def _main(args):
    source = Path(args.input)
    output = Path(args.output) if args.output else source.with_name(source.stem + ".predictions.csv")
    if args.batch_size < 1:  # before the model loads (from_run checks --max-length before it too)
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: name a file (e.g. {output / 'predictions.csv'})")
    existing = next(p for p in output.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"--output {output}: {existing} is a file, not a folder")
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} exists: pass --overwrite to replace it, or choose another --output")
    if output.resolve() == source.resolve():
        raise UserError(f"--output {output} is the input file")
    _, config = _saved_classifier(Path(args.run))
    label_column = args.label_column or config.get("label_column", "label")
    texts, given, rows = read_texts(source, args.text_column or config.get("text_column", "text"), label_column,
                                    label_required=args.label_column is not None)
    clf = TrainedClassifier.from_run(args.run, args.device, args.max_length)
    p = clf.predict_proba(texts, args.batch_size, args.progress)
    ids = None if given is None else _given_ids(given, clf.label_names)
    io.write_text(output, _table(texts, rows, given, ids, p, clf.label_names, args.all_probabilities))
    which = {"best-dev": ", the best on dev", "last": ", the last"}.get(config.get("keep_model"), "")
    print(f"predicted {len(texts)} text(s)" + (f" with the model of epoch {clf.epoch}{which}" if clf.epoch else "")
          + f": {output}")
    if given is not None:
        _report_given(given, ids, p, len(clf.label_names))
    elif source.suffix.lower() != ".txt":
        print(f"no column {label_column!r} in {source}: no given labels to check (--label-column names one)")
    return 0


def _given_ids(given, names):
    """Class id of each given label; -1 where a row has none, -2 where the model never saw it."""
    ids = {n: k for k, n in enumerate(names)}
    return np.array([-1 if y is None else ids.get(y, -2) for y in given], dtype=np.int64)


def _table(texts, rows, given, ids, p, names, all_probabilities):
    buf = _io.StringIO()
    w = csv.writer(buf)
    pred = p.argmax(-1)
    head = ["row", "predicted_label", "probability"]
    if given is not None:
        head += ["given_label", "given_label_probability", "agrees"]
    w.writerow(head + ([f"p_{n}" for n in names] if all_probabilities else []) + ["text"])
    for i, text in enumerate(texts):
        row = [rows[i], names[pred[i]], f"{p[i, pred[i]]:.6g}"]
        if given is not None:
            known = ids[i] >= 0
            row += [given[i] or "", f"{p[i, ids[i]]:.6g}" if known else "",
                    "" if ids[i] == -1 else int(known and ids[i] == pred[i])]
        w.writerow(row + ([f"{v:.6g}" for v in p[i]] if all_probabilities else []) + [text])
    return buf.getvalue()


def _report_given(given, ids, p, classes):
    unknown = sorted({y for y, k in zip(given, ids) if k == -2})
    if unknown:
        shown = unknown[:10] + (["..."] if len(unknown) > 10 else [])
        warnings.warn(f"{int((ids == -2).sum())} given label(s) are not among the {classes} labels the model "
                      f"was trained on ({shown}): they count as disagreements", UserWarning, stacklevel=2)
    labelled = ids != -1
    if labelled.any():
        agree, total = int((p.argmax(-1) == ids)[labelled].sum()), int(labelled.sum())
        print(f"given labels: {agree} of {total} agree with the model (accuracy {agree / total:.4f}); "
              "sort by given_label_probability to see the likeliest label errors first")


if __name__ == "__main__":
    sys.exit(main())
