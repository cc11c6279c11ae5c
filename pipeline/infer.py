"""`make infer`: every fold model × every TTA pass on the test set, one numbered submission each.

The models, views and image settings come from the run's saved config (what the models were
trained with), not from the live file. The same views are also applied to each fold's
validation images, so the user sees on out-of-fold data what TTA buys.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit

from pipeline.atomic import atomic_write_csv, atomic_write_text
from pipeline.config import Config, config_hash, load_config, save_config
from pipeline.data import frame_loader
from pipeline.ensemble import run_ensemble
from pipeline.errors import UserError
from pipeline.gpu_loader import resolve_decode
from pipeline.merge import load_test
from pipeline.metrics import safe_auc
from pipeline.model import MelanomaModel, load_model
from pipeline.predict import default_device, predict_logits
from pipeline.provenance import git_commit
from pipeline.submissions import append_manifest, write_numbered
from pipeline.submit import check_ids
from pipeline.train import fold_dir, read_folds
from pipeline.tta import combine_views, get_views

log = logging.getLogger(__name__)


@dataclass
class FoldModel:
    fold: int
    checkpoint: Path
    model: MelanomaModel
    cv_auc: float


def trained_config(cfg: Config) -> Config:
    """The config the run was trained with (runs/<experiment>/config.yaml), found under the live
    `runs_dir`: a run folder moved or copied elsewhere is read (and written) where it is now."""
    path = cfg.run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"experiment {cfg.experiment!r}: {path} not found; run `make train-all` first")
    trained = load_config(path)
    trained.runs_dir, trained.experiment = cfg.runs_dir, cfg.experiment
    return trained


def inferred_folds(cfg: Config, trained: Config) -> list[int]:
    """The run's folds, or those of `infer.folds`; a fold the run does not have is an error."""
    folds = sorted(int(f) for f in set(read_folds(trained)["fold"]) if f >= 0)
    unknown = sorted(set(cfg.infer.folds) - set(folds))
    if unknown:
        raise UserError(f"infer.folds: fold(s) {unknown} not in {trained.folds.output} (folds: {folds})")
    return [f for f in folds if not cfg.infer.folds or f in cfg.infer.folds]


def load_fold_models(cfg: Config, trained: Config) -> list[FoldModel]:
    """Every fold's checkpoint (`infer.checkpoint`: best | last); all missing ones named at once."""
    if cfg.infer.checkpoint not in ("best", "last"):
        raise UserError(f"infer.checkpoint must be 'best' or 'last', got {cfg.infer.checkpoint!r}")
    folds = inferred_folds(cfg, trained)
    paths = {f: fold_dir(trained, f) / f"{cfg.infer.checkpoint}.ckpt" for f in folds}
    missing = [f for f, p in paths.items() if not p.is_file()]
    if missing:
        raise UserError(
            f"experiment {cfg.experiment!r}: no {cfg.infer.checkpoint}.ckpt for fold(s) {missing} "
            f"under {trained.run_dir}; train them with `make train-all`"
        )
    aucs = _fold_aucs(trained, cfg.infer.checkpoint)
    return [FoldModel(f, p, load_model(str(p), trained.model), aucs.get(f, math.nan))
            for f, p in paths.items()]


def _fold_aucs(trained: Config, checkpoint: str) -> dict[int, float]:
    """Per-fold CV AUC from cv.json (the quoted metric: 2020 alone where monitored), if cv.json
    scored the same checkpoint as this inference uses; else none, with a warning."""
    path = trained.run_dir / "cv.json"
    if not path.is_file():
        return {}
    cv = json.loads(path.read_text())
    scored = cv.get("checkpoint", "best")
    if scored != checkpoint:
        log.warning("%s scores %s.ckpt but this inference uses %s.ckpt: the manifest gets no "
                    "per-fold CV (the OOF TTA table scores the models used)", path, scored, checkpoint)
        return {}
    key = "folds_2020" if cv.get("cv_auc_metric") == "oof_auc_2020" else "folds"
    return {int(k): v for k, v in cv[key].items()}


def tta_passes(cfg: Config) -> list[tuple[str, int | None]]:
    """(view, seed) of each pass: the dihedral views, then seeded random-augmentation passes."""
    views = [(v.name, None) for v in get_views(cfg.infer.views)] if cfg.infer.views else []
    seeds = [(f"random{cfg.infer.random_seed + i}", cfg.infer.random_seed + i)
             for i in range(cfg.infer.random_passes)]
    if not views and not seeds:
        raise UserError("no TTA pass configured: set infer.views or infer.random_passes")
    return views + seeds


def predict_all(cfg: Config, trained: Config, models: list[FoldModel], frame: pd.DataFrame,
                desc: str) -> np.ndarray:
    """Logits (M, P, N) of every model on every pass over `frame`'s images; NaN where skipped."""
    passes = tta_passes(cfg)
    views = [v for v, seed in passes if seed is None]
    out = np.full((len(models), len(passes), len(frame)), np.nan, np.float32)
    batch = cfg.infer.batch_size
    # image geometry from the trained config; where and how fast to decode from this run's
    data = replace(trained.data, decode=cfg.data.decode, num_workers=cfg.data.num_workers)
    nets = [m.model for m in models]
    device = default_device()
    if views:
        loader = frame_loader(frame, data, device, batch, model=trained.model, where=desc)
        index, logits = predict_logits(nets, loader, views, device, desc=desc,
                                       max_forward_batch=cfg.infer.max_forward_batch,
                                       progress=cfg.train.progress_bar)
        out[:, : len(views), index] = logits
    gpu = resolve_decode(data.decode, device) == "gpu"
    for p, (_, seed) in enumerate(passes[len(views):], start=len(views)):
        # the GPU path draws augmentations in the main process: any worker count is reproducible;
        # the CPU path draws them in the workers, so one process keeps the seeded stream
        loader = frame_loader(frame, data, device, batch, aug=trained.train.aug, seed=seed,
                              model=trained.model, where=desc, num_workers=None if gpu else 0)
        index, logits = predict_logits(nets, loader, ["identity"], device, desc=f"{desc} seed {seed}",
                                       progress=cfg.train.progress_bar)
        out[:, p, index] = logits[:, 0]
    return out


def write_submissions(cfg: Config, trained: Config, models: list[FoldModel], test: pd.DataFrame,
                      logits: np.ndarray) -> list[int]:
    """One numbered file per (model, pass) plus its manifest row; returns the numbers taken."""
    folder = Path(cfg.infer.submissions_dir)
    common = {"experiment": cfg.experiment, "config_hash": config_hash(trained),
              "git_commit": git_commit()}
    missing = np.isnan(logits).any(axis=(0, 1))
    if missing.any():  # checked before any file is written
        raise UserError(f"{int(missing.sum())} test image(s) could not be read "
                        f"({', '.join(test['image_name'][missing][:10])}); a submission needs every image")
    numbers = []
    for m, fm in enumerate(models):
        for p, (view, seed) in enumerate(tta_passes(cfg)):
            pred = expit(logits[m, p])
            df = pd.DataFrame({"image_name": test["image_name"].to_numpy(), "target": pred})
            n, path = write_numbered(df, folder)
            append_manifest(folder, {**common, "n": n, "file": path.name, "fold": fm.fold,
                                     "checkpoint": str(fm.checkpoint),
                                     "view": view, "seed": "" if seed is None else seed,
                                     "cv_auc": fm.cv_auc})
            numbers.append(n)
    log.info("wrote %s/submission{%d..%d}.csv (%d models x %d passes)", folder, min(numbers),
             max(numbers), len(models), len(tta_passes(cfg)))
    return numbers


OOF_TTA_NAME = "oof_tta.csv"


def oof_tta(cfg: Config, trained: Config, models: list[FoldModel]) -> None:
    """Each fold's validation images through its own model on every pass: fold<k>/oof_tta.csv."""
    folds = read_folds(trained)
    names = [f"pred_{view}" for view, _ in tta_passes(cfg)]
    for fm in models:
        valid = folds[folds["fold"] == fm.fold].reset_index(drop=True)
        logits = predict_all(cfg, trained, [fm], valid, f"oof tta fold {fm.fold}")[0]
        part = valid[["image_name", "patient_id", "source", "target", "fold"]].copy()
        for name, row in zip(names, logits, strict=True):
            part[name] = expit(row)
        part["pred_tta"] = combine_views(logits, cfg.infer.average)
        atomic_write_csv(part, fold_dir(trained, fm.fold) / OOF_TTA_NAME)


def merge_oof_tta(trained: Config, folds: list[int]) -> pd.DataFrame:
    """The folds' OOF TTA tables as the run's runs/<exp>/oof_tta.csv."""
    oof = pd.concat([pd.read_csv(fold_dir(trained, f) / OOF_TTA_NAME) for f in folds], ignore_index=True)
    atomic_write_csv(oof, trained.run_dir / OOF_TTA_NAME)
    return oof


def tta_table(oof: pd.DataFrame) -> pd.DataFrame:
    """OOF AUC with no TTA (identity), with each pass alone, and with all passes combined."""
    scored = oof.dropna(subset=[c for c in oof if c.startswith("pred_")])
    rows = [(c.removeprefix("pred_"), safe_auc(scored["target"], scored[c], c))
            for c in oof if c.startswith("pred_")]
    table = pd.DataFrame(rows, columns=["pass", "oof_auc"]).set_index("pass")
    base = table.loc["identity", "oof_auc"] if "identity" in table.index else math.nan
    table["gain_vs_identity"] = table["oof_auc"] - base
    return table


def check_test_ids(cfg: Config, test: pd.DataFrame) -> None:
    """The test ids must be the sample submission's, checked before anything is written."""
    sample = Path(cfg.data.sample_submission)
    if sample.is_file():
        check_ids(test["image_name"], sample, f"test set {cfg.data.test_csv}")
    else:
        log.warning("%s not found: the test ids are not checked against a sample submission", sample)


def infer_models(cfg: Config) -> list[int]:
    """Numbered submissions (and the per-fold OOF TTA tables) of the fold models `infer.folds`
    selects; returns the submission numbers taken. A shard of a parallel inference stops here."""
    trained = trained_config(cfg)
    models = load_fold_models(cfg, trained)
    test = load_test(cfg.data)
    check_test_ids(cfg, test)
    save_config(cfg, trained.run_dir, "infer.config.yaml")
    logits = predict_all(cfg, trained, models, test, "test tta")
    numbers = write_submissions(cfg, trained, models, test, logits)
    if cfg.infer.oof_tta:
        oof_tta(cfg, trained, models)
    return numbers


def run_infer(cfg: Config) -> Path:
    """The `make infer` stage: numbered submissions, the OOF TTA table, then the ensemble."""
    return finish_infer(cfg, infer_models(cfg))


def finish_infer(cfg: Config, numbers: list[int]) -> Path:
    """The OOF TTA table over the inferred folds, then the ensemble of exactly `numbers`."""
    trained = trained_config(cfg)
    if cfg.infer.oof_tta:
        table = tta_table(merge_oof_tta(trained, inferred_folds(cfg, trained)))
        atomic_write_text(trained.run_dir / "tta_oof.json", table.to_json(indent=2) + "\n")
        log.info("TTA on out-of-fold images (%s of views):\n%s", cfg.infer.average,
                 table.to_string(float_format="%.4f"))
    cfg.ensemble.experiments = [cfg.experiment]
    cfg.ensemble.numbers = numbers  # exactly this run's files, even if another run wrote meanwhile
    output = run_ensemble(cfg)
    log.info("final submission: %s\nupload with:\n  kaggle competitions submit %s -f %s -m \"...\""
             "\n(or `make submit MSG=...`, which checks it first and adds the CV and commit)",
             output, cfg.submit.competition, output)
    return output
