"""Clean-detection and memorisation figures, computed against the injected noise's true clean mask."""
import math

import numpy as np


def clean_detection(p_clean, clean_mask, threshold=0.5, true_labels=None):
    """AUROC and average precision of p_clean for 'label is clean', precision / recall of p > threshold.
    With true_labels, also per class (over classes with a clean sample): the mean of the per-class
    recalls and the fraction of classes none of whose clean samples is found, since a class whose
    clean samples are all called noisy never trains the adapters.

    Figures that are undefined (no noisy or no clean sample) are None, not a made-up number.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    p = np.asarray(p_clean, dtype=np.float64)
    y = np.asarray(clean_mask, dtype=bool)
    both = y.any() and (~y).any()
    pred = p > threshold
    out = {
        "auroc": float(roc_auc_score(y, p)) if both else None,
        "average_precision": float(average_precision_score(y, p)) if both else None,
        "precision": float(y[pred].mean()) if pred.any() else None,
        "recall": float(pred[y].mean()) if y.any() else None,
        "predicted_clean_fraction": float(pred.mean()),
    }
    if true_labels is not None:
        labels = np.asarray(true_labels)[y]
        found = pred[y]
        recalls = np.array([found[labels == c].mean() for c in np.unique(labels)])
        out["class_mean_recall"] = float(recalls.mean()) if len(recalls) else None
        out["classes_none_found"] = float((recalls == 0).mean()) if len(recalls) else None
    return out


def training_fit(pred, observed, true, clean_mask):
    """Accuracy on clean training samples and memorisation (noisy samples predicted as their noisy label)."""
    pred, observed, true = (np.asarray(a) for a in (pred, observed, true))
    clean = np.asarray(clean_mask, dtype=bool)
    noisy = ~clean
    return {
        "train_clean_accuracy": float((pred[clean] == true[clean]).mean()) if clean.any() else None,
        "noisy_memorisation": float((pred[noisy] == observed[noisy]).mean()) if noisy.any() else None,
        "noisy_true_label_recovered": float((pred[noisy] == true[noisy]).mean()) if noisy.any() else None,
    }


def classes_without_likely_clean(p_clean, observed, threshold=0.5):
    """The observed classes none of whose samples has p_clean above threshold (sorted ids): CleaR
    routes their samples through the adapters rarely, so the adapters stop learning them."""
    observed = np.asarray(observed)
    likely = np.unique(observed[np.asarray(p_clean) > threshold])
    return np.setdiff1d(np.unique(observed), likely).tolist()


def accuracy(pred, labels):
    return float((np.asarray(pred) == np.asarray(labels)).mean()) if len(labels) else math.nan


def mixture_summary(gmm):
    """Means, variances and weights of a fitted mixture, clean (smaller-mean) component first."""
    means = _np(gmm.means_).reshape(-1)
    order = np.argsort(means)
    return {
        "means": means[order].tolist(),
        "variances": _np(gmm.variances_).reshape(-1)[order].tolist(),
        "weights": _np(gmm.weights_).reshape(-1)[order].tolist(),
        "converged": bool(gmm.converged_),
        "n_iter": int(gmm.n_iter_),
    }


def _np(a):
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
