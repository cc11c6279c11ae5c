"""The report's figures, drawn with matplotlib (Agg) and returned as PNG bytes.

Each function takes plain tables and returns one figure; none reads files, so each is testable on
small frames. `png` closes the figure, so a long report never piles up open figures.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written to PNG

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from pipeline.merge import COMPETITION_SOURCE  # noqa: E402


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _roc(ax, y: np.ndarray, p: np.ndarray, label: str, **style) -> None:
    if len(np.unique(y)) < 2:
        return
    fpr, tpr, _ = roc_curve(y, p)
    ax.plot(fpr, tpr, label=f"{label} ({roc_auc_score(y, p):.4f})", **style)


def roc_figure(oof: pd.DataFrame, ci: dict[str, list[float]]) -> Figure:
    """ROC per fold and for the whole OOF, all rows (left) and 2020 images alone (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    parts = {"all rows": oof, "2020 images alone": oof[oof["source"] == COMPETITION_SOURCE]}
    for ax, (title, part) in zip(axes, parts.items(), strict=True):
        for fold, group in part.groupby("fold"):
            _roc(ax, group["target"].to_numpy(), group["pred"].to_numpy(), f"fold {fold}", lw=1, alpha=0.7)
        lo, hi = ci.get(title, [np.nan, np.nan])
        _roc(ax, part["target"].to_numpy(), part["pred"].to_numpy(),
             f"OOF, 95% CI [{lo:.4f}, {hi:.4f}]", lw=2.5, color="black")
        ax.plot([0, 1], [0, 1], ls=":", color="grey")
        ax.set(title=f"ROC, {title}", xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(loc="lower right", fontsize=8)
    return fig


def training_figure(metrics: pd.DataFrame, monitor: str, fold: int, last: bool = False) -> Figure:
    """One fold's curves from Lightning's CSV log: losses and AUCs per epoch, the learning rate
    per step, and the epoch whose checkpoint inference uses (best by `monitor`, or the last)."""
    fig, (loss_ax, auc_ax, lr_ax) = plt.subplots(1, 3, figsize=(14, 3.6))
    per_epoch = metrics.groupby("epoch").last()
    for column, ax in (("train_loss", loss_ax), ("val_loss", loss_ax), ("val_auc", auc_ax),
                       ("val_auc_2020", auc_ax)):
        if column in per_epoch and per_epoch[column].notna().any():
            series = per_epoch[column].dropna()
            ax.plot(series.index, series.to_numpy(), marker="o", ms=3, label=column)
    if last:
        chosen, name = int(per_epoch.index.max()), "last.ckpt"
    elif monitor in per_epoch and per_epoch[monitor].notna().any():
        chosen, name = int(per_epoch[monitor].idxmax()), "best.ckpt"  # the first maximum, as kept
    else:
        chosen = None
    if chosen is not None:
        for ax in (loss_ax, auc_ax):
            ax.axvline(chosen, color="red", ls="--", lw=1, label=f"{name} (epoch {chosen})")
    lr = [c for c in metrics if c.startswith("lr-")]
    if lr:
        steps = metrics.dropna(subset=[lr[0]])
        lr_ax.plot(steps["step"], steps[lr[0]])
    loss_ax.set(title=f"fold {fold}: loss", xlabel="epoch")
    auc_ax.set(title=f"fold {fold}: validation AUC", xlabel="epoch")
    lr_ax.set(title=f"fold {fold}: learning rate (OneCycle, per step)", xlabel="step")
    for ax in (loss_ax, auc_ax):
        ax.legend(fontsize=8)
    return fig


def tta_figure(table: pd.DataFrame) -> Figure:
    """OOF AUC of each TTA view and of their average (`tta`), identity marked."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    colors = ["black" if name == "tta" else "tab:blue" for name in table.index]
    ax.bar(table.index, table["oof_auc"], color=colors)
    if "identity" in table.index:
        ax.axhline(table.loc["identity", "oof_auc"], color="red", ls="--", lw=1, label="no TTA")
        ax.legend(fontsize=8)
    low = float(table["oof_auc"].min())
    ax.set_ylim(max(0.0, low - 0.02), min(1.0, float(table["oof_auc"].max()) + 0.01))
    ax.set(title="TTA on out-of-fold images", ylabel="OOF AUC")
    ax.tick_params(axis="x", rotation=30)
    return fig


def correlation_figure(preds: np.ndarray, names: list[str]) -> Figure:
    """Pearson correlation of the ensemble members' test predictions."""
    corr = np.corrcoef(preds) if len(preds) > 1 else np.ones((1, 1))
    size = min(12, 2 + 0.35 * len(names))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(corr, vmin=min(0.0, float(np.nanmin(corr))), vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title("correlation of the members' test predictions")
    return fig


def calibration_figure(oof: pd.DataFrame, test_pred: np.ndarray | None) -> Figure:
    """OOF predictions by class, the reliability curve, and the test predictions."""
    fig, (hist_ax, rel_ax, test_ax) = plt.subplots(1, 3, figsize=(14, 3.6))
    bins = np.linspace(0, 1, 41)
    for target, label in ((0, "benign"), (1, "melanoma")):
        hist_ax.hist(oof.loc[oof["target"] == target, "pred"], bins=bins, alpha=0.6, density=True, label=label)
    hist_ax.set(title="OOF predictions by class", xlabel="prediction", ylabel="density")
    hist_ax.legend(fontsize=8)
    if oof["target"].nunique() == 2:
        frac, mean = calibration_curve(oof["target"], oof["pred"], n_bins=10, strategy="quantile")
        rel_ax.plot(mean, frac, marker="o")
    rel_ax.plot([0, 1], [0, 1], ls=":", color="grey")
    rel_ax.set(title="reliability (OOF, deciles)", xlabel="mean prediction", ylabel="share positive")
    if test_pred is not None:
        test_ax.hist(test_pred, bins=bins, color="tab:green")
    test_ax.set(title="final submission: test predictions", xlabel="prediction", ylabel="images")
    return fig
