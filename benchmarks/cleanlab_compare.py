"""CleaR's clean detection against cleanlab's, on the same finished run.

    pip install cleanlab   # only for this comparison
    python benchmarks/cleanlab_compare.py RUN [RUN ...] [--out benchmarks/results]

RUN: the --output-dir of a finished clear_fast run with injected noise (so the flipped labels are
known) and its adapter/ saved. Both methods read the same model output: the run's last
clean-probability pass, whose ensemble logits the checkpoint keeps as the next epoch's teacher.

- CleaR: the two-component Gaussian mixture on the per-sample losses; clean when p_clean > 0.5
  (per_sample.csv's clean_probability), ranked by p_clean.
- cleanlab: confident learning on the same probabilities: ``cleanlab.filter.find_label_issues``
  (prune_by_noise_rate, its default) flags label issues, the rest kept as clean; ranked by
  ``cleanlab.rank.get_label_quality_scores`` (self-confidence, its default).

cleanlab asks for out-of-sample probabilities (K-fold cross-validation: K trainings); these are
in-sample, from the routed model itself, so this compares the two filters given one model's
probabilities, not cleanlab's full recipe. Times: CleaR's mixture (clean_fast.clean_probability, from
the losses) and cleanlab's find_label_issues plus its quality scores, each the median of 5 calls on
this machine's CPU.
"""
import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mixture_table import machine, save_json_and_md  # noqa: E402

from clear_fast import clean_probability  # noqa: E402
from clear_fast.metrics import clean_detection  # noqa: E402


def load_run(run):
    """(observed labels [N], clean mask [N], p_clean [N], ensemble probabilities [N, K], label names)."""
    run = Path(run)
    names = json.loads((run / "adapter" / "labels.json").read_text())["label_names"]
    with open(run / "per_sample.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["index"]))
    if "flipped" not in rows[0]:
        raise SystemExit(f"{run}: no injected noise, so no known flipped labels to score detection against")
    ids = {n: k for k, n in enumerate(names)}
    observed = np.array([ids[r["observed_label"]] for r in rows])
    clean = np.array([r["flipped"] == "0" for r in rows])
    p_clean = np.array([float(r["clean_probability"]) for r in rows])
    teacher = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["teacher"]
    probs = torch.softmax(teacher.float(), -1).numpy()
    if probs.shape != (len(rows), len(names)):
        raise SystemExit(f"{run}: the checkpoint's teacher has shape {probs.shape}, expected "
                         f"({len(rows)}, {len(names)})")
    return observed, clean, p_clean, probs, names


def median_ms(fn, calls=5):
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare(run):
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    observed, clean, p_clean, probs, names = load_run(run)
    # in float64, so that no ties arise that the probabilities do not have (a 0 stays finite)
    losses = -np.log(np.clip(probs[np.arange(len(observed)), observed].astype(np.float64), 1e-300, None))
    issues = find_label_issues(observed, probs)
    quality = get_label_quality_scores(observed, probs)

    def figures(scores, keep):
        det = clean_detection(keep.astype(np.float64), clean, true_labels=observed)
        return {"auroc": clean_detection(scores, clean)["auroc"], "precision": det["precision"],
                "recall": det["recall"], "kept_fraction": det["predicted_clean_fraction"],
                "class_mean_recall": det["class_mean_recall"], "classes_none_found": det["classes_none_found"]}

    cfg = json.loads((Path(run) / "config.json").read_text())
    made = {k: cfg.get(k) for k in ("method", "dataset", "noise_type", "noise_rate", "classwise_losses", "seed",
                                      "num_epochs", "model")}
    return {"run": str(run), "made_with": made, "samples": len(observed), "classes": len(names),
            "noisy_fraction": float(1 - clean.mean()),
            "clear": {**figures(p_clean, p_clean > 0.5),
                      "ms": median_ms(lambda: clean_probability(losses))},
            # the mixture's input: its posterior ties at 0 wherever the noisy component dominates by
            # hundreds of orders of magnitude, so its AUROC ranks those samples at random; per_sample.csv
            # breaks the ties by this loss
            "loss": {"auroc": clean_detection(-losses, clean)["auroc"], "ties_at_zero": float((p_clean == 0).mean())},
            "cleanlab": {**figures(quality, ~issues),
                         "ms": median_ms(lambda: (find_label_issues(observed, probs),
                                                  get_label_quality_scores(observed, probs)))}}


def table(results, command, info):
    cols = ("auroc", "precision", "recall", "kept_fraction", "class_mean_recall", "classes_none_found", "ms")
    lines = ["# Clean detection: CleaR's mixture vs cleanlab's confident learning, same probabilities", "",
             f"`{command}` (method: the module docstring; in-sample probabilities)", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "Clean = label not flipped. auroc: of p_clean (CleaR) or the label quality score (cleanlab) for "
             "'clean'; precision / recall: of the samples kept as clean (CleaR p_clean > 0.5, cleanlab: not a "
             "label issue); class_mean_recall / classes_none_found: per class of the observed label; ms: the "
             "filter's CPU time.", "",
             "| run | N | noisy | method | " + " | ".join(cols) + " |",
             "|---|---:|---:|---|" + "---:|" * len(cols)]
    fmt = lambda v: "-" if v is None else f"{v:.1f}" if isinstance(v, float) and v > 2 else f"{v:.3f}"
    for r in results:
        for method in ("clear", "cleanlab", "loss"):
            lines.append(f"| {Path(r['run']).name} | {r['samples']} | {r['noisy_fraction']:.2f} | {method} | "
                         + " | ".join(fmt(r[method].get(c)) for c in cols) + " |")
    lines += [""] + [f"- {Path(r['run']).name}: " + ", ".join(f"{k} {v}" for k, v in r["made_with"].items())
                     for r in results]
    lines += ["", "loss: the pass's per-sample loss on the observed label (cleanlab's self-confidence is "
              "exp(-loss); CleaR's mixture fits it, centred per class with classwise_losses); its AUROC is "
              "the ranking both start from. CleaR's p_clean is "
              "exactly 0 for " + ", ".join(f"{r['loss']['ties_at_zero']:.0%}" for r in results)
              + " of the samples (in run order), which its AUROC ranks at random."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    import cleanlab

    info = machine()
    info["cleanlab"] = cleanlab.__version__
    results = [compare(r) for r in args.runs]
    command = "python benchmarks/cleanlab_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = table(results, command, info)
    print(md)
    save_json_and_md(args.out, "cleanlab_compare", {"machine": info, "command": command, "results": results}, md)


if __name__ == "__main__":
    main()
