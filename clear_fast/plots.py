"""PNG plots: the loss histogram with the fitted mixture over it, and curves over epochs."""
import numpy as np

from .io import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_histogram(losses, clean_mask, mixture, path, title):
    """Per-sample losses split by true clean / noisy, with the fitted mixture's densities drawn over."""
    plt = _pyplot()
    losses = np.asarray(losses, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    bins = np.linspace(0, max(losses.max(), 1e-6), 60)
    if clean_mask is not None and (~clean_mask).any():
        ax.hist(losses[clean_mask], bins=bins, density=True, alpha=0.55, label=f"clean ({clean_mask.sum()})")
        ax.hist(losses[~clean_mask], bins=bins, density=True, alpha=0.55,
                label=f"noisy ({(~clean_mask).sum()})")
    else:
        ax.hist(losses, bins=bins, density=True, alpha=0.6, label="all samples")
    if mixture is not None:
        xs = np.linspace(0, bins[-1], 400)
        for k, (m, v, w) in enumerate(zip(mixture["means"], mixture["variances"], mixture["weights"])):
            ax.plot(xs, w * np.exp(-(xs - m) ** 2 / (2 * v)) / np.sqrt(2 * np.pi * v),
                    lw=2, label=("clean" if k == 0 else "noisy") + f" component (mean {m:.2f})")
    ax.set_xlabel("per-sample loss on the observed label")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def curves(records, path, title, injected=True):
    """Test / dev accuracy and clean-detection AUROC over epochs; injected: whether noise was injected
    (else every training sample counts as clean)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = "train (clean samples)" if injected else "train"
    for key, label in (("test_accuracy", "test"), ("dev_accuracy", "dev"), ("train_clean_accuracy", train)):
        ys = [r.get(key) for r in records]
        if any(y is not None for y in ys):
            a1.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=label)
    a1.set_xlabel("epoch")
    a1.set_ylabel("accuracy")
    for key, label in (("clean_auroc", "AUROC"), ("clean_average_precision", "average precision"),
                       ("routed_fraction", "routed fraction"), ("noisy_memorisation", "noisy memorised")):
        ys = [r.get(key) for r in records]
        if any(y is not None for y in ys):
            a2.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=label)
    a2.set_xlabel("epoch")
    a2.set_ylim(-0.02, 1.02)
    for ax in (a1, a2):
        if ax.get_legend_handles_labels()[0]:  # clean data: no detection curves to label
            ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)
