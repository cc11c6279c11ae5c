"""The synthetic data set: Kaggle layout, real-set shape, determinism, a sane ceiling, lesion images."""

import importlib.util
import logging
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.cli import UserError
from pipeline.config import SyntheticConfig
from pipeline.synthetic import (
    BENIGN_DIAGNOSES,
    EXTERNAL_SITES,
    SITES,
    build_competition_tables,
    build_external_table,
    ceiling_auc,
    generate_synthetic,
    images_per_patient,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_patients=12, n_test_patients=4, n_external_lesions=10, image_size=64,
             positive_rate=0.2, seed=0, n_jobs=1)

TRAIN_COLUMNS = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
                 "diagnosis", "benign_malignant", "target"]
TEST_COLUMNS = TRAIN_COLUMNS[:5]
GT_COLUMNS = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
META_COLUMNS = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
# The real 2020 train.csv's diagnosis values, and the benign classes that look suspicious.
REAL_2020_DIAGNOSES = {
    "unknown", "nevus", "melanoma", "seborrheic keratosis", "lentigo NOS", "lichenoid keratosis",
    "solar lentigo", "atypical melanocytic proliferation", "cafe-au-lait macule",
}
SUSPICIOUS_2020 = ["seborrheic keratosis", "lentigo NOS", "lichenoid keratosis", "solar lentigo",
                   "atypical melanocytic proliferation"]
SUSPICIOUS_2019 = ["BCC", "AK", "SCC", "BKL"]


def small_cfg(out: Path, **changes) -> SyntheticConfig:
    return SyntheticConfig(out_dir=str(out), **{**SMALL, **changes})


def raw(path: Path) -> pd.DataFrame:
    """A CSV as written: strings, empty cells kept as ''."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate_synthetic(small_cfg(out))


def test_layout_and_exact_columns(small):
    out, _ = small
    assert list(raw(out / "train.csv").columns) == TRAIN_COLUMNS
    assert list(raw(out / "test.csv").columns) == TEST_COLUMNS
    assert list(raw(out / "sample_submission.csv").columns) == ["image_name", "target"]
    assert list(raw(out / "external/ISIC_2019_Training_GroundTruth.csv").columns) == GT_COLUMNS
    assert list(raw(out / "external/ISIC_2019_Training_Metadata.csv").columns) == META_COLUMNS
    for truth in ("_truth/train_latent.csv", "_truth/test_labels.csv"):
        assert list(raw(out / truth).columns) == ["image_name", "target", "latent"]
    assert not list(out.rglob("*.tmp")), "atomic writes left temporary files"


def test_competition_values_look_like_kaggle(small):
    out, _ = small
    train, test = raw(out / "train.csv"), raw(out / "test.csv")
    for df in (train, test):
        assert df["image_name"].str.fullmatch(r"ISIC_[0-8]\d{6}").all()
        assert df["patient_id"].str.fullmatch(r"IP_\d{7}").all()
        assert set(df["sex"]) <= {"male", "female", ""}
        ages = df.loc[df["age_approx"] != "", "age_approx"].astype(float)
        assert (ages % 5 == 0).all() and ages.between(0, 90).all()
        assert set(df["anatom_site_general_challenge"]) <= set(SITES) | {""}
    assert set(train["diagnosis"]) <= set(BENIGN_DIAGNOSES) | {"melanoma"}
    assert set(train["target"]) == {"0", "1"}
    malignant = train["target"] == "1"
    assert (train.loc[malignant, "benign_malignant"] == "malignant").all()
    assert (train.loc[malignant, "diagnosis"] == "melanoma").all()
    assert (train.loc[~malignant, "benign_malignant"] == "benign").all()
    for column in ("sex", "age_approx", "anatom_site_general_challenge"):
        assert 0 < (train[column] == "").sum() < len(train), column
    assert train["age_approx"].str.fullmatch(r"(\d+\.0)?").all()  # floats, as in the real file


def test_counts_patients_and_submission(small):
    out, summary = small
    train, test = raw(out / "train.csv"), raw(out / "test.csv")
    for df, folder in ((train, "jpeg/train"), (test, "jpeg/test")):
        assert sorted(p.stem for p in (out / folder).glob("*.jpg")) == sorted(df["image_name"])
    assert set(train["patient_id"]).isdisjoint(test["patient_id"])
    assert set(train["image_name"]).isdisjoint(test["image_name"])
    assert train["patient_id"].nunique() == SMALL["n_patients"]
    assert test["patient_id"].nunique() == SMALL["n_test_patients"]
    assert train.groupby("patient_id").size().min() >= 2
    assert test.groupby("patient_id").size().min() >= 2
    sub = raw(out / "sample_submission.csv")
    assert sub["image_name"].tolist() == test["image_name"].tolist()
    assert (sub["target"] == "0").all()
    assert (summary.n_train, summary.n_test) == (len(train), len(test))
    truth = raw(out / "_truth/test_labels.csv")
    assert truth["image_name"].tolist() == test["image_name"].tolist()


def test_external_set_shaped_like_isic2019(small):
    out, summary = small
    gt = raw(out / "external/ISIC_2019_Training_GroundTruth.csv")
    meta = raw(out / "external/ISIC_2019_Training_Metadata.csv")
    assert gt["image"].tolist() == meta["image"].tolist()
    assert gt["image"].str.fullmatch(r"ISIC_9\d{6}").all()
    onehot = gt[GT_COLUMNS[1:]]
    assert set(np.unique(onehot.to_numpy())) <= {"0.0", "1.0"}
    assert (onehot.astype(float).sum(axis=1) == 1).all()
    assert sorted(p.stem for p in (out / "external/jpeg").glob("*.jpg")) == sorted(gt["image"])
    assert set(meta["anatom_site_general"]) <= set(EXTERNAL_SITES) | {""}
    sizes = meta.loc[meta["lesion_id"] != "", "lesion_id"].value_counts()
    assert sizes.max() >= 2, "no lesion has several images"
    assert summary.n_external == len(gt)
    mel = gt.assign(lesion=meta["lesion_id"]).query("lesion != ''").groupby("lesion")["MEL"]
    assert (mel.nunique() == 1).all(), "one lesion with two diagnoses"


def mean_latent(df: pd.DataFrame, classes: list[str]) -> float:
    return df.loc[df["diagnosis"].isin(classes), "latent"].mean()


def test_benign_diagnosis_follows_the_latent(tmp_path):
    """Among negatives the diagnosis tracks the latent: what a 9-class target can learn beyond 0/1."""
    cfg = small_cfg(tmp_path, n_patients=400, n_external_lesions=2000)
    train, _ = build_competition_tables(cfg)
    assert set(train["diagnosis"]) <= REAL_2020_DIAGNOSES
    assert (train.loc[train["target"] == 1, "diagnosis"] == "melanoma").all()
    benign = train[train["target"] == 0]
    share = benign["diagnosis"].value_counts(normalize=True)
    assert 0.75 < share["unknown"] < 0.9 and 0.1 < share["nevus"] < 0.22  # real: 83% and 16%
    assert benign["diagnosis"].isin(SUSPICIOUS_2020).sum() >= 10
    assert mean_latent(benign, SUSPICIOUS_2020) > mean_latent(benign, ["unknown"]) + 0.1
    assert mean_latent(benign, ["unknown"]) > mean_latent(benign, ["nevus"]) + 0.15

    ext = build_external_table(cfg)
    assert set(ext["diagnosis"]) <= set(GT_COLUMNS[1:])
    assert (ext.groupby("lesion")["diagnosis"].nunique() == 1).all()
    lesions = ext.drop_duplicates("lesion")
    assert ((lesions["diagnosis"] == "MEL") == (lesions["target"] == 1)).all()
    benign = lesions[lesions["target"] == 0]
    assert mean_latent(benign, SUSPICIOUS_2019) > mean_latent(benign, ["NV", "DF", "VASC"]) + 0.3


def test_external_lesion_ids_sometimes_missing(tmp_path):
    ext = build_external_table(small_cfg(tmp_path, n_external_lesions=200))
    assert ext["lesion_id"].isna().any()
    assert ext.loc[ext["lesion_id"].isna()].groupby("lesion").size().max() == 1
    assert 0.08 < ext["target"].mean() < 0.3  # ISIC 2019 has 18% MEL


def test_same_seed_same_bytes_and_n_jobs_do_not_matter(small, tmp_path):
    out, _ = small
    again = generate_synthetic(small_cfg(tmp_path / "a", n_jobs=1))
    parallel = generate_synthetic(small_cfg(tmp_path / "b", n_jobs=2))
    reference = all_files(out)
    assert len([k for k in reference if k.endswith(".jpg")]) == again.n_train + again.n_test + again.n_external
    assert all_files(tmp_path / "a") == reference
    assert all_files(tmp_path / "b") == reference
    assert parallel.ceiling_auc_train == again.ceiling_auc_train


def test_other_seed_differs_and_stale_images_go(small, tmp_path):
    out, _ = small
    generate_synthetic(small_cfg(tmp_path, seed=1))
    assert raw(tmp_path / "train.csv")["image_name"].tolist() != raw(out / "train.csv")["image_name"].tolist()
    mine = sorted((tmp_path / "jpeg/train").glob("*.jpg"))[:5]
    theirs = sorted((out / "jpeg/train").glob("*.jpg"))[:5]
    assert [p.read_bytes() for p in mine] != [p.read_bytes() for p in theirs]
    generate_synthetic(small_cfg(tmp_path, seed=2, n_patients=3, n_external_lesions=2))
    for csv, folder, column in (("train.csv", "jpeg/train", "image_name"),
                                ("external/ISIC_2019_Training_GroundTruth.csv", "external/jpeg", "image")):
        names = raw(tmp_path / csv)[column]
        assert sorted(p.stem for p in (tmp_path / folder).glob("*.jpg")) == sorted(names)


def test_images_decode_and_show_a_dark_lesion(small):
    out, _ = small
    paths = sorted((out / "jpeg/train").glob("*.jpg"))[:60]
    darker, smooth = [], []
    for path in paths:
        img = cv2.imread(str(path))
        assert img is not None and img.shape == (64, 64, 3)
        grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(float)
        centre = grey[26:38, 26:38].mean()
        edges = np.concatenate([grey[3:8, 26:38].ravel(), grey[-8:-3, 26:38].ravel(),
                                grey[26:38, 3:8].ravel(), grey[26:38, -8:-3].ravel()]).mean()
        darker.append(centre < edges - 20)
        # Pictures, not noise: neighbouring pixels correlate (about 0 for noise).
        smooth.append(np.corrcoef(grey[:, :-1].ravel(), grey[:, 1:].ravel())[0, 1])
    assert np.mean(darker) > 0.9
    assert min(smooth) > 0.5 and np.mean(smooth) > 0.75


def test_lesion_look_follows_the_latent(small):
    """Higher latent score -> larger, darker lesion: the signal a model can learn."""
    out, _ = small
    truth = raw(out / "_truth/train_latent.csv")
    dark = []
    for name in truth["image_name"]:
        grey = cv2.cvtColor(cv2.imread(str(out / "jpeg/train" / f"{name}.jpg")), cv2.COLOR_BGR2GRAY)
        dark.append((grey[8:-8, 8:-8] < 0.6 * np.median(grey)).mean())
    rho = pd.Series(dark).corr(truth["latent"].astype(float), method="spearman")
    assert rho > 0.3


def test_ceiling_auc_sane_and_rate_kept(tmp_path):
    cfg = small_cfg(tmp_path, n_patients=300, n_test_patients=100, positive_rate=0.15)
    train, test = build_competition_tables(cfg)
    for df in (train, test):
        auc = ceiling_auc(df["target"].to_numpy(), df["latent"].to_numpy())
        assert 0.75 < auc < 0.999
        assert abs(df["target"].mean() - 0.15) < 0.04
    clean = build_competition_tables(replace(cfg, label_noise=0.0))[0]
    noisy = build_competition_tables(replace(cfg, label_noise=0.3))[0]
    assert ceiling_auc(noisy["target"], noisy["latent"]) < ceiling_auc(clean["target"], clean["latent"]) - 0.05


def test_summary_ceiling_matches_truth_files(small):
    out, summary = small
    truth = pd.read_csv(out / "_truth/train_latent.csv")
    assert summary.ceiling_auc_train == pytest.approx(ceiling_auc(truth["target"], truth["latent"]))
    assert summary.train_positive_rate == pytest.approx(truth["target"].mean())
    assert Path(summary.paths["train_csv"]) == out / "train.csv"


def test_shaped_on_the_real_set(tmp_path):
    counts = images_per_patient(np.random.default_rng(0), 20000)
    assert counts.min() >= 2 and counts.max() <= 115
    assert 10 <= np.median(counts) <= 14
    assert np.quantile(counts, 0.99) > 4 * np.median(counts)  # heavy right tail
    train, _ = build_competition_tables(small_cfg(tmp_path, n_patients=1000, positive_rate=0.0176))
    assert 0.01 < train["target"].mean() < 0.026
    per_patient = train.groupby("patient_id")["target"].sum()
    assert 0.05 < (per_patient > 0).mean() < 0.4  # real: 428 of 2,056 patients


@pytest.mark.parametrize("change", [dict(positive_rate=0.0), dict(label_noise=0.6),
                                    dict(n_patients=0), dict(image_size=8), dict(n_jobs=0)])
def test_bad_settings_rejected(tmp_path, change):
    with pytest.raises(UserError):
        generate_synthetic(small_cfg(tmp_path, **change))
    assert not (tmp_path / "train.csv").exists()


def test_script_logs_ceiling(tmp_path, caplog):
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "scripts/make_synthetic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    overrides = [f"synthetic.{k}={v}" for k, v in SMALL.items()] + [f"synthetic.out_dir={tmp_path}"]
    with caplog.at_level(logging.INFO):
        script.run(script.main, "test", argv=overrides)
    assert re.search(r"ceiling AUC \(latent score\) train=0\.\d+ test=0\.\d+", caplog.text)
    assert (tmp_path / "train.csv").is_file()
