"""`make compare`: train and infer each option of `compare.variants` over `compare.seeds`, then
one table of CV and (on generated data) hidden-test AUC, mean and spread per option.

Every run is an ordinary experiment (`<variant>_s<seed>`) under `runs_dir`, so a killed
comparison resumes like any training: finished folds are skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_write_csv, atomic_write_text
from pipeline.config import Config, load_config
from pipeline.infer import run_infer
from pipeline.report import ceiling, hidden_test_auc
from pipeline.train import train_all

log = logging.getLogger(__name__)


def variant_config(base: Config, config_path: str | None, overrides: list[str], variant: list[str],
                   name: str, seed: int) -> Config:
    """The base config with one variant's overrides, one training seed and its own output paths."""
    experiment = f"{name}_s{seed}"
    subs = Path(base.compare.output) / "submissions" / experiment
    return load_config(config_path, [*overrides, *variant, f"train.seed={seed}",
                                     f"experiment={experiment}", f"infer.submissions_dir={subs}",
                                     f"ensemble.output={subs / 'ensemble.csv'}"])


def run_one(cfg: Config) -> dict:
    summary = train_all(cfg)
    output = run_infer(cfg)
    tta = json.loads((cfg.run_dir / "tta_oof.json").read_text())["oof_auc"]
    return {"cv_auc": summary["cv_auc"], "cv_tta": tta.get("tta"),
            "test_auc": hidden_test_auc(cfg, output)}


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and range per variant."""
    stats = rows.groupby("variant", sort=False)[["cv_auc", "cv_tta", "test_auc"]].agg(["mean", "std", "min", "max"])
    stats.columns = [f"{a}_{b}" for a, b in stats.columns]
    return stats.round(4)


def markdown(stats: pd.DataFrame, cfg: Config, seeds: list[int]) -> str:
    lines = ["| option | CV AUC (no TTA) | CV AUC (8-view TTA) | hidden-test AUC |",
             "|---|---|---|---|"]
    for variant, r in stats.iterrows():
        cells = [f"{r[f'{k}_mean']:.4f} ± {r[f'{k}_std']:.4f}" for k in ("cv_auc", "cv_tta", "test_auc")]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    train_c, test_c = ceiling(cfg, "train"), ceiling(cfg, "test")
    if train_c is not None:
        lines.append(f"| ceiling (latent score) | {train_c:.4f} | {train_c:.4f} | {test_c:.4f} |")
    lines.append(f"\nmean ± standard deviation over training seeds {seeds}")
    return "\n".join(lines)


def run_compare(cfg: Config, config_path: str | None, overrides: list[str]) -> pd.DataFrame:
    """Every variant x seed on the folds of `folds.output`; writes `<compare.output>/compare.csv` and `.md`."""
    rows = []
    for name, variant in cfg.compare.variants.items():
        for seed in cfg.compare.seeds:
            run_cfg = variant_config(cfg, config_path, overrides, list(variant), name, seed)
            log.info("compare: %s, seed %d", name, seed)
            rows.append({"variant": name, "seed": seed, **run_one(run_cfg)})
    table = pd.DataFrame(rows)
    out = Path(cfg.compare.output)
    atomic_write_csv(table, out / "compare.csv")
    text = markdown(summarize(table), cfg, list(cfg.compare.seeds))
    atomic_write_text(out / "compare.md", text + "\n")
    log.info("comparison (%s)\n%s", out / "compare.md", text)
    return table
