"""The closing summary of a run: CV AUC, the TTA gain on OOF, the final CSV, and (on generated
data, whose hidden test labels are known) the test AUC next to the generator's ceiling."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from pipeline.config import Config
from pipeline.metrics import safe_auc

log = logging.getLogger(__name__)

# how ensemble.json's cv_auc was measured (its cv_auc_source)
ENSEMBLE_LABELS = {
    "oof": "ensemble OOF AUC",
    "oof_in_sample": "ensemble OOF AUC (in-sample: weights fitted on these rows)",
    "manifest_mean": "members' mean CV AUC",
}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def truth_dir(cfg: Config) -> Path:
    """Where the synthetic generator keeps its hidden labels: `_truth/` beside train.csv."""
    return Path(cfg.data.train_csv).parent / "_truth"


def hidden_test_auc(cfg: Config, submission: Path) -> float | None:
    """AUC of a submission against hidden test labels, where such labels exist (generated data)."""
    labels = truth_dir(cfg) / "test_labels.csv"
    if not (labels.is_file() and submission.is_file()):
        return None
    merged = pd.read_csv(labels).merge(pd.read_csv(submission), on="image_name", suffixes=("", "_pred"))
    return safe_auc(merged["target"], merged["target_pred"], "hidden test AUC")


def ceiling(cfg: Config, split: str) -> float | None:
    """The AUC the generator's latent score reaches: the best any model can do."""
    name = {"train": "train_latent.csv", "test": "test_labels.csv"}[split]
    path = truth_dir(cfg) / name
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    return safe_auc(df["target"], df["latent"], f"{split} ceiling")


def _rows_note(ens: dict) -> str | None:
    if ens.get("cv_auc_rows") == "2020":
        return f"on 2020 images (all images {ens['cv_auc_all']:.4f})"
    return "on all images" if ens.get("cv_auc_rows") == "all" else None


def ensemble_line(ens: dict) -> str:
    """The ensemble's CV from its JSON, labelled with how it was measured and on which rows."""
    label = ENSEMBLE_LABELS.get(ens.get("cv_auc_source"), "ensemble CV AUC")
    notes = [n for n in (_rows_note(ens), f"{ens['method']} of {len(ens['files'])} files") if n]
    return f"{label:<25} {ens['cv_auc']:.4f}  ({'; '.join(notes)})"


def cv_lines(cv: dict) -> list[str]:
    """The run's CV from cv.json: all rows and 2020 alone, and what chose the checkpoints."""
    lo, hi = cv["oof_auc_ci95"]
    lines = [f"CV AUC (OOF, no TTA)      {cv['oof_auc']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]  all rows"]
    lo, hi = cv.get("oof_auc_2020_ci95", [float("nan")] * 2)
    lines.append(f"CV AUC, 2020 images only  {cv['oof_auc_2020']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")
    if "monitor" in cv:  # cv.json files written before the monitor was recorded lack it
        lines.append(f"checkpoints               {cv['checkpoint']}.ckpt chosen by {cv['monitor']}; "
                     f"the CV quoted is {cv['cv_auc_metric']} = {cv['cv_auc']:.4f}")
    return lines


def summary_lines(cfg: Config) -> list[str]:
    """The summary's lines for `cfg.experiment`: only those whose inputs exist."""
    cv = _read_json(cfg.run_dir / "cv.json")
    tta = _read_json(cfg.run_dir / "tta_oof.json")
    output = Path(cfg.ensemble.output)
    ens = _read_json(output.with_suffix(".json"))
    lines = [f"experiment {cfg.experiment}"]
    if cv:
        lines += cv_lines(cv)
    if tta and {"tta", "identity"} <= set(tta["oof_auc"]):
        auc = tta["oof_auc"]
        lines.append(f"TTA on OOF                {auc['tta']:.4f}  (gain {auc['tta'] - auc['identity']:+.4f}"
                     " over no TTA)")
    if ens and ens.get("cv_auc") is not None:
        lines.append(ensemble_line(ens))
    train_ceiling = ceiling(cfg, "train")
    if train_ceiling is not None:
        lines.append(f"ceiling (latent score)    {train_ceiling:.4f}  train / {ceiling(cfg, 'test'):.4f} test")
    test_auc = hidden_test_auc(cfg, output)
    if test_auc is not None:
        lines.append(f"hidden test AUC           {test_auc:.4f}  of {output}")
    lines.append(f"final submission          {output}")
    return lines


def report(cfg: Config) -> str:
    """Log the summary and write runs/<experiment>/report.html beside it."""
    lines = summary_lines(cfg)
    text = "\n".join(lines)
    log.info("summary\n%s", text)
    from pipeline.report_html import write_html_report  # matplotlib only when a report is made

    path = write_html_report(cfg, lines)
    if path is not None:
        log.info("report: %s", path.resolve())
    return text
