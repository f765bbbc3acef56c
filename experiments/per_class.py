"""Per-class clean detection and fit at the end of runs, from their per_sample.csv (work dirs).

    python experiments/per_class.py runs/experiments/ablations/banking77__symmetric0.4__*__seed0

For each run: recall of p_clean > 0.5 over the clean samples, its mean over classes, the fraction of
classes none of whose clean samples is found (they no longer train the adapters), the precision of
p > 0.5, the accuracy on clean training samples, the fraction of classes whose clean training samples
are mostly misclassified, and the memorisation of noisy labels. Classes are the true labels.
"""
import sys
from pathlib import Path

import pandas as pd

from clear_fast.metrics import clean_detection


def per_class(path):
    d = pd.read_csv(Path(path) / "per_sample.csv")
    clean, noisy = d[d.flipped == 0], d[d.flipped == 1]
    det = clean_detection(d.clean_probability, d.flipped == 0, true_labels=d.true_label)
    fit = (clean.predicted_label == clean.true_label).groupby(clean.true_label).mean()
    return {**{k: det[k] for k in ("recall", "class_mean_recall", "classes_none_found", "precision")},
            "clean_train_accuracy": (clean.predicted_label == clean.true_label).mean(),
            "classes_mostly_misfit": (fit < 0.5).mean(),
            "noisy_memorised": (noisy.predicted_label == noisy.observed_label).mean()}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = {Path(p).name: per_class(p) for p in sys.argv[1:]}
    keys = list(next(iter(rows.values())))
    print("| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
