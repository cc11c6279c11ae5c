"""Ensembling and numbered submissions: hand-checked blends, order independence, refusals, concurrency."""

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from pipeline.cli import UserError
from pipeline.config import Config
from pipeline.ensemble import (
    blend_by_model,
    ensemble,
    fit_weights,
    mean_average,
    rank_average,
    read_members,
    run_ensemble,
    weighted_average,
)
from pipeline.submissions import (
    MANIFEST_COLUMNS,
    append_manifest,
    read_manifest,
    select_members,
    write_numbered,
)


def _write(path: Path, ids, values) -> Path:
    pd.DataFrame({"image_name": ids, "target": values}).to_csv(path, index=False)
    return path


@pytest.fixture
def three_files(tmp_path):
    """Three members over ids a, b, c, each with its rows in a different order."""
    a = _write(tmp_path / "a.csv", ["a", "b", "c"], [0.1, 0.9, 0.5])
    b = _write(tmp_path / "b.csv", ["c", "a", "b"], [0.8, 0.3, 0.2])
    c = _write(tmp_path / "c.csv", ["b", "c", "a"], [0.4, 0.6, 0.2])
    return [a, b, c]


# --- blends on known inputs -----------------------------------------------------------------


def test_mean_average_by_hand():
    np.testing.assert_allclose(mean_average(np.array([[0.1, 0.9], [0.3, 0.5]])), [0.2, 0.7])


def test_rank_average_by_hand():
    # ranks [1, 3, 2] / 3 and [2, 1, 3] / 3
    preds = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    np.testing.assert_allclose(rank_average(preds), [0.5, 2 / 3, 5 / 6])


def test_rank_average_averages_ties_and_stays_in_unit_interval():
    out = rank_average(np.array([[0.5, 0.5, 0.5, 0.9]]))
    np.testing.assert_allclose(out, [0.5, 0.5, 0.5, 1.0])  # ties share rank 2 of 4


def test_weighted_average_uses_normalised_weights_on_ranks():
    preds = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    # ranks [1/3, 1, 2/3] and [2/3, 1/3, 1], weighted 3/4 and 1/4
    np.testing.assert_allclose(weighted_average(preds, [3, 1]), [5 / 12, 5 / 6, 3 / 4])
    with pytest.raises(UserError, match="non-negative"):
        weighted_average(preds, [1, -1])


def test_read_members_aligns_rows_on_image_name(three_files):
    ids, preds = read_members(three_files)
    assert list(ids) == ["a", "b", "c"]
    np.testing.assert_allclose(preds, [[0.1, 0.9, 0.5], [0.3, 0.2, 0.8], [0.2, 0.4, 0.6]])


def test_mean_ensemble_by_hand_and_independent_of_file_order(three_files):
    out = ensemble(three_files, "mean")
    assert list(out["image_name"]) == ["a", "b", "c"]
    np.testing.assert_allclose(out["target"], [0.2, 0.5, 19 / 30])
    for order in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
        pd.testing.assert_frame_equal(ensemble([three_files[i] for i in order], "mean"), out)


def test_rank_ensemble_by_hand_and_independent_of_file_order(three_files):
    out = ensemble(three_files, "rank")
    # ranks: a.csv [1, 3, 2], b.csv [2, 1, 3], c.csv [1, 2, 3] (each / 3)
    np.testing.assert_allclose(out["target"], [4 / 9, 6 / 9, 8 / 9])
    assert out["target"].between(0, 1).all()
    pd.testing.assert_frame_equal(ensemble(three_files[::-1], "rank"), out)


def test_weighted_ensemble_moves_weights_with_their_files(three_files):
    out = ensemble(three_files, "weighted", [0.5, 0.3, 0.2])
    flipped = ensemble(three_files[::-1], "weighted", [0.2, 0.3, 0.5])
    pd.testing.assert_frame_equal(out, flipped)
    with pytest.raises(UserError, match="needs weights"):
        ensemble(three_files, "weighted")


def test_unknown_method_is_refused(three_files):
    with pytest.raises(UserError, match=r"'median'.*mean.*rank.*weighted"):
        ensemble(three_files, "median")


# --- fitted weights ---------------------------------------------------------------------------


def _noisy_members(n=400, m=4, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    noise = np.array([1.0, 1.5, 2.0, 3.0])[:m, None]
    return y, y + noise * rng.normal(size=(m, n))


def test_fit_weights_are_a_distribution_and_beat_the_best_member():
    y, preds = _noisy_members()
    w = fit_weights(preds, y)
    assert w.shape == (4,)
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    best_single = max(roc_auc_score(y, p) for p in preds)
    assert roc_auc_score(y, weighted_average(preds, w)) >= best_single
    np.testing.assert_array_equal(fit_weights(preds, y), w)  # deterministic


def test_fit_weights_keeps_a_perfect_member_alone():
    y, preds = _noisy_members(m=3)
    preds[1] = y + 0.01 * np.arange(len(y)) / len(y)  # separates the classes perfectly
    np.testing.assert_array_equal(fit_weights(preds, y), [0, 1, 0])


def test_fit_weights_needs_both_classes():
    with pytest.raises(UserError, match="both 0 and 1"):
        fit_weights(np.ones((2, 3)), np.zeros(3))


# --- refusals -----------------------------------------------------------------------------------


def test_refuses_files_with_different_ids(tmp_path):
    a = _write(tmp_path / "a.csv", ["x1", "x2", "x3"], [0.1, 0.2, 0.3])
    b = _write(tmp_path / "b.csv", ["x1", "x2", "x9"], [0.1, 0.2, 0.3])
    with pytest.raises(
        UserError, match=r"b\.csv: image ids differ.*1 missing \(x3\), 1 extra \(x9\)"
    ):
        ensemble([a, b], "mean")


@pytest.mark.parametrize("bad", ["nan", "inf", "high", "1.5", ""])
def test_refuses_bad_values_naming_file_and_line(tmp_path, bad):
    good = _write(tmp_path / "a.csv", ["x1", "x2", "x3"], [0.1, 0.2, 0.3])
    path = tmp_path / "b.csv"
    path.write_text(f"image_name,target\nx1,0.1\nx2,{bad}\nx3,0.3\n")
    with pytest.raises(UserError, match=r"b\.csv: column 'target'.*1 row\(s\).*line\(s\) 3"):
        ensemble([good, path], "rank")


def test_refuses_duplicate_ids(tmp_path):
    path = _write(tmp_path / "d.csv", ["x1", "x1", "x2"], [0.1, 0.2, 0.3])
    with pytest.raises(UserError, match=r"d\.csv: 1 duplicate.*x1"):
        read_members([path])


# --- numbered submissions and the manifest ----------------------------------------------------------


def _frame(tag: str) -> pd.DataFrame:
    return pd.DataFrame(
        {"image_name": [f"{tag}_{k}" for k in range(30)], "target": np.linspace(0, 1, 30)}
    )


def test_write_numbered_takes_next_free_number_and_never_overwrites(tmp_path):
    (tmp_path / "submission3.csv").write_text("keep me\n")
    n, path = write_numbered(_frame("x"), tmp_path)
    assert (n, path.name) == (4, "submission4.csv")
    assert (tmp_path / "submission3.csv").read_text() == "keep me\n"
    pd.testing.assert_frame_equal(pd.read_csv(path), _frame("x"))
    assert write_numbered(_frame("y"), tmp_path)[0] == 5
    assert not list(tmp_path.glob(".*.tmp"))


def _writer(folder: str, worker: int, count: int, barrier) -> None:
    barrier.wait()
    for i in range(count):
        n, path = write_numbered(_frame(f"w{worker}_{i}"), folder)
        append_manifest(folder, {"n": n, "file": path.name, "experiment": f"w{worker}", "fold": i})


def test_concurrent_writers_never_share_a_number(tmp_path):
    ctx = mp.get_context("fork")
    workers, count = 4, 10
    barrier = ctx.Barrier(workers)
    procs = [
        ctx.Process(target=_writer, args=(str(tmp_path), w, count, barrier)) for w in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * workers
    files = sorted(tmp_path.glob("submission*.csv"))
    assert len(files) == workers * count
    assert sorted(int(f.stem.removeprefix("submission")) for f in files) == list(range(1, 41))
    seen = set()
    for f in files:
        df = pd.read_csv(f)
        tag = df["image_name"][0].rsplit("_", 1)[0]
        pd.testing.assert_frame_equal(df, _frame(tag))
        seen.add(tag)
    assert len(seen) == workers * count  # no file replaced another's content
    manifest = read_manifest(tmp_path)
    assert len(manifest) == workers * count
    assert sorted(manifest["n"]) == list(range(1, 41))
    assert (tmp_path / "manifest.csv").read_text().count("n,file,") == 1
    for row in manifest.itertuples():  # each manifest row points at the file its writer wrote
        df = pd.read_csv(tmp_path / row.file)
        assert df["image_name"][0] == f"{row.experiment}_{row.fold}_0"


def test_manifest_rejects_unknown_columns(tmp_path):
    with pytest.raises(ValueError, match="unknown manifest column"):
        append_manifest(tmp_path, {"n": 1, "colour": "red"})


def test_read_manifest_without_file_is_empty(tmp_path):
    df = read_manifest(tmp_path)
    assert df.empty and list(df.columns) == MANIFEST_COLUMNS


def _manifest(tmp_path) -> pd.DataFrame:
    rows = [
        (1, "exp_a", 0, "identity"), (2, "exp_a", 1, "identity"), (3, "exp_a", 0, "hflip"),
        (4, "exp_b", 0, "identity"), (5, "exp_b", 1, "hflip"), (6, "exp_b", 2, "identity"),
    ]  # fmt: skip
    for n, exp, fold, view in rows[::-1]:
        append_manifest(tmp_path, {"n": n, "file": f"submission{n}.csv", "experiment": exp,
                                   "fold": fold, "view": view, "cv_auc": 0.8})  # fmt: skip
    return read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, [1, 2, 3, 4, 5, 6]),
        ({"experiments": ["exp_b"]}, [4, 5, 6]),
        ({"folds": [0]}, [1, 3, 4]),
        ({"views": ["hflip"]}, [3, 5]),
        ({"experiments": ["exp_a", "exp_b"], "views": ["identity"], "folds": [0, 2]}, [1, 4, 6]),
        ({"n_min": 2, "n_max": 4}, [2, 3, 4]),
        ({"n_min": 5}, [5, 6]),
        ({"numbers": [6, 2, 9]}, [2, 6]),
        ({"experiments": ["nope"]}, []),
    ],
)
def test_select_members_filters(tmp_path, filters, expected):
    assert list(select_members(_manifest(tmp_path), **filters)["n"]) == expected


# --- run_ensemble from a manifest and OOF files ----------------------------------------------------


TRAIN_IDS = [f"train_{i:03d}" for i in range(60)]
TEST_IDS = [f"test_{i:03d}" for i in range(25)]
MEMBERS = [  # experiment, fold, view of submission<N>.csv, N = position + 1
    ("exp_a", 0, "identity"), ("exp_a", 1, "identity"),
    ("exp_a", 0, "hflip"), ("exp_a", 1, "hflip"),
    ("exp_b", 0, "identity"), ("exp_b", 1, "identity"),
]  # fmt: skip


N_2020 = 40  # the first 40 OOF rows are competition (2020) images, the other 20 external


def _write_oof(runs: Path, rng) -> None:
    y = np.tile([0, 0, 1], 20)
    source = ["isic2020"] * N_2020 + ["isic2019"] * (60 - N_2020)
    for exp in ("exp_a", "exp_b"):
        df = pd.DataFrame({"image_name": TRAIN_IDS, "target": y, "fold": np.arange(60) % 2,
                           "source": source})
        for view, noise in (("identity", 1.0), ("hflip", 1.5)):
            df[f"pred_{view}"] = 1 / (1 + np.exp(-(y + noise * rng.normal(size=60))))
        (runs / exp).mkdir(parents=True)
        df.to_csv(runs / exp / "oof_tta.csv", index=False)


def _setup_run(tmp_path, method: str, reverse: bool = False) -> Config:
    rng = np.random.default_rng(1)
    subs = tmp_path / "submissions"
    _write_oof(tmp_path / "runs", rng)
    subs.mkdir(parents=True)
    for n in range(1, len(MEMBERS) + 1):
        order = rng.permutation(len(TEST_IDS))  # rows in a different order in each file
        _write(subs / f"submission{n}.csv", np.array(TEST_IDS)[order], rng.random(len(TEST_IDS)))
    numbered = list(enumerate(MEMBERS, start=1))
    for n, (exp, fold, view) in numbered[::-1] if reverse else numbered:
        append_manifest(subs, {"n": n, "file": f"submission{n}.csv", "experiment": exp,
                               "fold": fold, "view": view, "cv_auc": 0.7 + n / 100})  # fmt: skip
    cfg = Config()
    cfg.runs_dir = str(tmp_path / "runs")
    cfg.infer.submissions_dir = str(subs)
    cfg.ensemble.method = method
    cfg.ensemble.output = str(subs / "ensemble.csv")
    return cfg


@pytest.mark.parametrize("method", ["mean", "rank", "weighted"])
def test_run_ensemble_writes_blend_and_summary(tmp_path, method):
    out = run_ensemble(_setup_run(tmp_path, method))
    df = pd.read_csv(out)
    assert list(df["image_name"]) == TEST_IDS
    assert df["target"].between(0, 1).all()
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["method"] == method
    assert len(summary["files"]) == len(MEMBERS) and sum(summary["weights"]) == pytest.approx(1)
    assert min(summary["weights"]) >= 0
    assert summary["cv_auc_source"] == ("oof_in_sample" if method == "weighted" else "oof")
    assert 0.5 < summary["cv_auc"] <= 1
    if method == "mean":
        # views of one model first (exp_a folds 0 and 1 have two views each), then the models
        ids, preds = read_members([Path(f) for f in sorted(summary["files"])])
        by_n = {int(Path(f).stem.removeprefix("submission")): p
                for f, p in zip(sorted(summary["files"]), preds, strict=True)}
        models = [(by_n[1] + by_n[3]) / 2, (by_n[2] + by_n[4]) / 2, by_n[5], by_n[6]]
        np.testing.assert_allclose(df["target"], np.mean(models, axis=0))


def test_blend_by_model_logit_average_of_views(tmp_path):
    members = pd.DataFrame({"experiment": ["e", "e", "e"], "fold": [0, 0, 1],
                            "checkpoint": ["best"] * 3,
                            "path": [str(tmp_path / f"s{i}.csv") for i in range(3)]})
    ids = np.array(["a", "b"])
    values = [[0.2, 0.9], [0.6, 0.5], [0.3, 0.3]]
    for path, v in zip(members["path"], values, strict=True):
        _write(Path(path), ids, np.array(v))
    out = blend_by_model(members, "mean", "logit")
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    expit = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    fold0 = expit((logit(np.array(values[0])) + logit(np.array(values[1]))) / 2)
    np.testing.assert_allclose(out["target"], (fold0 + np.array(values[2])) / 2)


def test_weighted_run_beats_its_best_group_on_oof(tmp_path):
    cfg = _setup_run(tmp_path, "weighted")
    summary = json.loads(run_ensemble(cfg).with_suffix(".json").read_text())
    groups = {(g["experiment"], g["view"]) for g in summary["groups"]}
    assert groups == {("exp_a", "hflip"), ("exp_a", "identity"), ("exp_b", "identity")}
    best = 0.0
    for exp, view in groups:
        oof = pd.read_csv(Path(cfg.runs_dir) / exp / "oof_tta.csv")
        best = max(best, roc_auc_score(oof["target"], oof[f"pred_{view}"]))
    assert summary["cv_auc_all"] >= best  # the weights were fitted on all OOF rows


@pytest.mark.parametrize("method", ["mean", "rank", "weighted"])
def test_run_ensemble_ignores_manifest_order(tmp_path, method):
    a = pd.read_csv(run_ensemble(_setup_run(tmp_path / "a", method)))
    b = pd.read_csv(run_ensemble(_setup_run(tmp_path / "b", method, reverse=True)))
    pd.testing.assert_frame_equal(a, b)


def test_run_ensemble_filters_and_falls_back_to_manifest_auc(tmp_path):
    cfg = _setup_run(tmp_path, "rank")
    (Path(cfg.runs_dir) / "exp_b" / "oof_tta.csv").unlink()
    cfg.ensemble.experiments = ["exp_b"]
    summary = json.loads(run_ensemble(cfg).with_suffix(".json").read_text())
    assert [Path(f).name for f in summary["files"]] == ["submission5.csv", "submission6.csv"]
    assert summary["cv_auc_source"] == "manifest_mean"
    assert summary["cv_auc"] == pytest.approx(0.755)


def test_run_ensemble_says_which_filters_matched_nothing(tmp_path):
    cfg = _setup_run(tmp_path, "mean")
    cfg.ensemble.views = ["rot45"]
    cfg.ensemble.folds = [3]
    with pytest.raises(
        UserError, match=r"match the ensemble filters .*folds=\[3\], views=\['rot45'\]"
    ):
        run_ensemble(cfg)


def test_weighted_run_needs_oof_predictions(tmp_path):
    cfg = _setup_run(tmp_path, "weighted")
    (Path(cfg.runs_dir) / "exp_b" / "oof_tta.csv").unlink()
    with pytest.raises(UserError, match=r"exp_b.oof_tta\.csv: file not found"):
        run_ensemble(cfg)


# --- the OOF figure of a mean or rank run: the test blend's recipe, on 2020 rows ---------------


def _ranks(p: np.ndarray) -> np.ndarray:
    return rankdata(p) / len(p)


VIEW_AVERAGES = {  # how one model's views combine, written out by hand
    "mean": lambda views: np.mean(views, axis=0),
    "logit": lambda views: expit(np.mean(logit(views), axis=0)),
    "rank": lambda views: np.mean([_ranks(v) for v in views], axis=0),
}


def _hand_oof(runs: Path, average: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """`(y, blended)`: exp_a's two views and exp_b's one view combined by `average`, then by `method`."""
    a, b = (pd.read_csv(runs / exp / "oof_tta.csv") for exp in ("exp_a", "exp_b"))
    combine = VIEW_AVERAGES[average]
    per_exp = [combine(np.stack([a["pred_identity"], a["pred_hflip"]])),
               combine(np.stack([b["pred_identity"]]))]
    if method == "rank":
        per_exp = [_ranks(p) for p in per_exp]
    return a["target"].to_numpy(), np.mean(per_exp, axis=0)


@pytest.mark.parametrize(("average", "method"),
                         [("mean", "mean"), ("logit", "mean"), ("rank", "mean"), ("logit", "rank")])
def test_oof_auc_follows_the_test_blend_on_2020_rows(tmp_path, average, method):
    cfg = _setup_run(tmp_path, method)
    cfg.infer.average = average
    summary = json.loads(run_ensemble(cfg).with_suffix(".json").read_text())
    y, blended = _hand_oof(Path(cfg.runs_dir), average, method)
    assert summary["cv_auc_rows"] == "2020"
    assert summary["cv_auc"] == pytest.approx(roc_auc_score(y[:N_2020], blended[:N_2020]))
    assert summary["cv_auc_all"] == pytest.approx(roc_auc_score(y, blended))
    assert summary["cv_auc"] != pytest.approx(summary["cv_auc_all"])  # the rows tell them apart


def test_weighted_run_reports_2020_rows_too(tmp_path):
    summary = json.loads(run_ensemble(_setup_run(tmp_path, "weighted")).with_suffix(".json").read_text())
    assert summary["cv_auc_source"] == "oof_in_sample"
    assert summary["cv_auc_rows"] == "2020"
    assert summary["cv_auc"] != pytest.approx(summary["cv_auc_all"])


@pytest.mark.parametrize("edit", [lambda df: df.drop(columns="source"),
                                  lambda df: df.assign(source="isic2019")],
                         ids=["no-source-column", "no-2020-rows"])
def test_oof_without_2020_rows_is_scored_on_all_rows(tmp_path, edit):
    cfg = _setup_run(tmp_path, "mean")
    for exp in ("exp_a", "exp_b"):
        path = Path(cfg.runs_dir) / exp / "oof_tta.csv"
        edit(pd.read_csv(path)).to_csv(path, index=False)
    summary = json.loads(run_ensemble(cfg).with_suffix(".json").read_text())
    y, blended = _hand_oof(Path(cfg.runs_dir), "mean", "mean")
    assert summary["cv_auc_rows"] == "all"
    assert summary["cv_auc"] == summary["cv_auc_all"] == pytest.approx(roc_auc_score(y, blended))
