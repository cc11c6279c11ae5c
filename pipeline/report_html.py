"""`make report`'s HTML page: one self-contained file (figures embedded as PNG data) per experiment.

Sections: summary, fold audit, ROC curves, training curves, TTA on OOF, the ensemble, calibration
and test predictions, and the run itself (config, commit, stage times). A section whose inputs are
missing says which file it looked for instead of disappearing.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from string import Template

import pandas as pd

from pipeline import plots
from pipeline.atomic import atomic_write_text
from pipeline.config import Config, load_config, to_yaml
from pipeline.ensemble import read_members
from pipeline.folds import audit, balance
from pipeline.merge import COMPETITION_SOURCE
from pipeline.report import ENSEMBLE_LABELS
from pipeline.submissions import read_manifest

log = logging.getLogger(__name__)

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body { font-family: sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.missing { color: #a33; }
</style></head>
<body>
<h1>$title</h1>
$body
<script>
// marks how many figures the browser could decode: checked by the headless-browser test
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", ok + "/" + images.length);
});
</script>
</body></html>
""")


def figure(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def missing(what: str, path: Path) -> str:
    return f'<p class="missing">{html.escape(what)}: {html.escape(str(path))} not found</p>'


def table(df: pd.DataFrame) -> str:
    return df.to_html(float_format=lambda v: f"{v:.4f}", na_rep="", border=0)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summary_section(lines: list[str]) -> str:
    return "<h2>Summary</h2><pre>" + html.escape("\n".join(lines)) + "</pre>"


def audit_section(trained: Config) -> str:
    path = Path(trained.folds.output)
    if not path.is_file():
        return "<h2>Folds</h2>" + missing("folds file", path)
    folds = pd.read_csv(path, dtype={"patient_id": "string"})
    parts = [("all rows", folds)]
    if (folds["source"] != COMPETITION_SOURCE).any():
        parts.append(("2020 images alone", folds[folds["source"] == COMPETITION_SOURCE]))
    out = [f"<h2>Folds</h2><p>{html.escape(str(path))}</p>"]
    for title, part in parts:
        spreads = pd.DataFrame([balance(part)]).T.rename(columns={0: "spread"})
        out.append(f"<h3>{title}</h3>{table(audit(part))}<details><summary>spreads</summary>"
                   f"{table(spreads)}</details>")
    return "".join(out)


def roc_section(cfg: Config, cv: dict | None) -> str:
    path = cfg.run_dir / "oof.csv"
    if not path.is_file() or cv is None:
        return "<h2>ROC curves</h2>" + missing("out-of-fold predictions", path)
    oof = pd.read_csv(path).dropna(subset=["pred"])
    ci = {"all rows": cv["oof_auc_ci95"],  # files from before the 2020 interval lack it
          "2020 images alone": cv.get("oof_auc_2020_ci95", [float("nan")] * 2)}
    return "<h2>ROC curves</h2>" + figure(plots.png(plots.roc_figure(oof, ci)), "ROC curves")


def fold_metrics(fold_dir: Path) -> pd.DataFrame | None:
    """A fold's CSV log, every version (a resumed fit starts a new one) in order."""
    files = sorted(fold_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True) if files else None


def fold_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(fold, folder) of every `fold<k>` folder of a run, in fold order."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("fold*") if (m := re.fullmatch(r"fold(\d+)", p.name))]
    return sorted(found)


def training_section(cfg: Config, cv: dict | None) -> str:
    monitor = (cv or {}).get("monitor", "val_auc_2020")
    checkpoint = (cv or {}).get("checkpoint", "best")
    out = [f"<h2>Training curves</h2><p>best.ckpt chosen by {html.escape(monitor)}; inference and the "
           f"CV use {html.escape(checkpoint)}.ckpt</p>"]
    folds = fold_dirs(cfg.run_dir)
    for fold, fold_dir in folds:
        metrics = fold_metrics(fold_dir)
        if metrics is None:
            out.append(missing(f"{fold_dir.name} training log", fold_dir / "csv"))
            continue
        fig = plots.training_figure(metrics, monitor, fold, last=checkpoint == "last")
        out.append(figure(plots.png(fig), f"training curves {fold_dir.name}"))
    if not folds:
        out.append(missing("fold folders", cfg.run_dir))
    return "".join(out)


def tta_section(cfg: Config) -> str:
    path = cfg.run_dir / "tta_oof.json"
    data = _json(path)
    if data is None:
        return "<h2>TTA on out-of-fold images</h2>" + missing("TTA table", path)
    tta = pd.DataFrame(data)
    return ("<h2>TTA on out-of-fold images</h2>" + table(tta)
            + figure(plots.png(plots.tta_figure(tta)), "TTA per view"))


def ensemble_section(cfg: Config) -> tuple[str, pd.Series | None]:
    output = Path(cfg.ensemble.output)
    info = _json(output.with_suffix(".json"))
    if info is None:
        return "<h2>Ensemble</h2>" + missing("ensemble summary", output.with_suffix(".json")), None
    label = ENSEMBLE_LABELS.get(info.get("cv_auc_source"), "ensemble CV AUC")
    members = pd.DataFrame({"file": [Path(f).name for f in info["files"]], "weight": info["weights"]})
    auc = "n/a" if info.get("cv_auc") is None else f"{info['cv_auc']:.4f}"
    text = (f"<h2>Ensemble</h2><p>{html.escape(str(output))}: {info['method']} of {len(members)} files; "
            f"{label} {auc} on {info.get('cv_auc_rows') or 'unknown'} rows</p>")
    present = [f for f in info["files"] if Path(f).is_file()]
    absent = [Path(f).name for f in info["files"] if f not in present]
    if absent:
        text += (f'<p class="missing">{len(absent)} member file(s) no longer on disk, left out of the '
                 f'correlation: {html.escape(", ".join(absent[:10]))}</p>')
    test = None
    if present:
        ids, preds = read_members(present)
        names = [Path(f).name for f in present]
        text += figure(plots.png(plots.correlation_figure(preds, names)), "member correlation")
    if output.is_file():
        test = pd.read_csv(output)["target"]
    return text + f"<details><summary>members</summary>{table(members)}</details>", test


def calibration_section(cfg: Config, test: pd.Series | None) -> str:
    path = cfg.run_dir / "oof.csv"
    if not path.is_file():
        return "<h2>Predictions</h2>" + missing("out-of-fold predictions", path)
    oof = pd.read_csv(path).dropna(subset=["pred"])
    fig = plots.calibration_figure(oof, None if test is None else test.to_numpy())
    return "<h2>Predictions and calibration</h2>" + figure(plots.png(fig), "calibration")


def _mtime(path: Path) -> datetime | None:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) if path.exists() else None


def stage_times(cfg: Config, trained: Config) -> pd.DataFrame:
    """When each stage ended and how long it took, from its files' modification times."""
    rows = [("folds", None, _mtime(Path(trained.folds.output)))]
    for _, fold_dir in fold_dirs(cfg.run_dir):
        rows.append((f"train {fold_dir.name}", _mtime(fold_dir / "config.yaml"), _mtime(fold_dir / "oof.csv")))
    # infer.config.yaml is written once the test ids pass, before any prediction
    rows.append(("infer + ensemble", _mtime(cfg.run_dir / "infer.config.yaml"), _mtime(Path(cfg.ensemble.output))))
    df = pd.DataFrame(rows, columns=["stage", "started", "ended"])
    seconds = [(e - s).total_seconds() if s is not None and e is not None else None
               for s, e in zip(df["started"], df["ended"], strict=True)]
    return df.assign(seconds=seconds)


def run_section(cfg: Config, trained: Config) -> str:
    manifest = read_manifest(cfg.infer.submissions_dir)
    commits = sorted(set(manifest.loc[manifest["experiment"] == cfg.experiment, "git_commit"].dropna()))
    return (f"<h2>Run</h2><p>git commit(s) of its submissions: {html.escape(', '.join(commits) or 'none recorded')}"
            f"</p><h3>Stage times (from file times)</h3>{table(stage_times(cfg, trained))}"
            f"<details><summary>trained config ({html.escape(str(cfg.run_dir / 'config.yaml'))})</summary>"
            f"<pre>{html.escape(to_yaml(trained))}</pre></details>")


def write_html_report(cfg: Config, lines: list[str]) -> Path | None:
    """runs/<experiment>/report.html from whatever the run has produced so far."""
    config_path = cfg.run_dir / "config.yaml"
    if not config_path.is_file():
        log.warning("no HTML report: %s not found (train the experiment first)", config_path)
        return None
    trained = load_config(config_path)
    cv = _json(cfg.run_dir / "cv.json")
    ensemble, test = ensemble_section(cfg)
    body = "".join([
        summary_section(lines), audit_section(trained), roc_section(cfg, cv), training_section(cfg, cv),
        tta_section(cfg), ensemble, calibration_section(cfg, test), run_section(cfg, trained),
    ])
    path = cfg.run_dir / "report.html"
    atomic_write_text(path, PAGE.substitute(title=html.escape(f"report: {cfg.experiment}"), body=body))
    log.info("wrote %s", path)
    return path
