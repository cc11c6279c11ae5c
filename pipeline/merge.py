"""Merge the 2020 training CSV and optional ISIC-2019-style external sets into one table."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.cli import UserError
from pipeline.config import ColumnsConfig, DataConfig, ExternalConfig
from pipeline.tables import check_binary, check_files_exist, check_unique, read_csv

log = logging.getLogger(__name__)

COMPETITION_SOURCE = "isic2020"
MERGED_COLUMNS = [
    "image_name", "patient_id", "target", "source", "sex", "age_approx", "anatom_site",
    "diagnosis", "image_path",
]


def image_paths(names: pd.Series, folder: str, ext: str) -> pd.Series:
    return folder.rstrip("/") + "/" + names + ext


def _optional(df: pd.DataFrame, column: str) -> pd.Series:
    """A metadata column that may be absent from a file (then all missing)."""
    return df[column] if column in df.columns else pd.Series(pd.NA, index=df.index)


def fill_patients(patients: pd.Series, images: pd.Series, path: str) -> pd.Series:
    """Images without a patient id form a group of their own, so they still never straddle folds."""
    missing = patients.isna() | (patients.astype("string").str.strip() == "")
    if missing.any():
        log.warning("%s: %d row(s) without a patient id; each becomes its own group",
                    path, int(missing.sum()))
    return patients.where(~missing, "image:" + images)


def load_competition(data: DataConfig) -> pd.DataFrame:
    """The 2020 training CSV in the merged column layout."""
    c = data.columns
    path = data.train_csv
    df = read_csv(path, [c.image, c.patient, c.target])
    check_unique(df, c.image, path)
    return pd.DataFrame({
        "image_name": df[c.image],
        "patient_id": fill_patients(df[c.patient], df[c.image], path),
        "target": check_binary(df, c.target, path),
        "source": COMPETITION_SOURCE,
        "sex": _optional(df, c.sex),
        "age_approx": pd.to_numeric(_optional(df, c.age), errors="coerce"),
        "anatom_site": _optional(df, c.site),
        "diagnosis": _optional(df, c.diagnosis),
        "image_path": image_paths(df[c.image], data.train_images, data.image_ext),
    })


def _external_diagnosis(gt: pd.DataFrame, c: ColumnsConfig) -> np.ndarray:
    """The one-hot diagnosis columns' name (ISIC 2019 ground truth), else a `diagnosis` column."""
    dx_cols = [d for d in c.ext_diagnoses if d in gt.columns]
    if not dx_cols:
        return _optional(gt, c.diagnosis).to_numpy()
    dx = gt[dx_cols].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy()
    return np.where(dx.max(axis=1) > 0, np.array(dx_cols)[dx.argmax(axis=1)], None)


def load_external(ext: ExternalConfig, c: ColumnsConfig, image_ext: str) -> pd.DataFrame:
    """An ISIC 2019 style set: one-hot ground truth plus optional metadata with `lesion_id`.

    External images have no patient: they are grouped by lesion, else each by itself.
    """
    gt_path = ext.ground_truth_csv
    gt = read_csv(gt_path, [c.ext_image, c.ext_target])
    check_unique(gt, c.ext_image, gt_path)
    target = check_binary(gt, c.ext_target, gt_path)
    diagnosis = _external_diagnosis(gt, c)
    meta = gt  # without a separate metadata file, the ground-truth file holds the metadata
    if ext.metadata_csv:
        meta = read_csv(ext.metadata_csv, [c.ext_image])
        check_unique(meta, c.ext_image, ext.metadata_csv)
        meta = gt[[c.ext_image]].merge(meta, on=c.ext_image, how="left")
    lesion = _optional(meta, c.ext_lesion).astype("string")
    lesion = lesion.where(lesion.notna() & (lesion.str.strip() != ""), pd.NA)
    patient = ("lesion:" + lesion).fillna("image:" + gt[c.ext_image])
    return pd.DataFrame({
        "image_name": gt[c.ext_image],
        "patient_id": patient.to_numpy(),
        "target": target,
        "source": ext.name,
        "sex": _optional(meta, c.ext_sex).to_numpy(),
        "age_approx": pd.to_numeric(_optional(meta, c.ext_age), errors="coerce").to_numpy(),
        "anatom_site": _optional(meta, c.ext_site).to_numpy(),
        "diagnosis": diagnosis,
        "image_path": image_paths(gt[c.ext_image], ext.images, image_ext),
    })


def drop_duplicates(df: pd.DataFrame, path: str, c: ColumnsConfig) -> pd.DataFrame:
    """Drop the second image of each known duplicate pair (ISIC's list), keeping the first."""
    pairs = read_csv(path, [c.dup_image, c.dup_other])
    drop = set(pairs[c.dup_other]) - set(pairs[c.dup_image])
    keep = ~df["image_name"].isin(drop)
    log.info("%s: dropped %d duplicate image(s)", path, int((~keep).sum()))
    return df[keep].reset_index(drop=True)


def merge_tables(data: DataConfig) -> pd.DataFrame:
    """One table of every training image: 2020 first, then each external set, duplicates removed."""
    parts = [load_competition(data)]
    parts += [load_external(ext, data.columns, data.image_ext) for ext in data.external]
    df = pd.concat(parts, ignore_index=True)
    clash = df["image_name"].duplicated(keep=False)
    if clash.any():
        names = sorted(set(df.loc[clash, "image_name"]))
        raise UserError(
            f"{len(names)} image name(s) appear in more than one input set: {names[:10]}"
        )
    if data.duplicates_csv:
        df = drop_duplicates(df, data.duplicates_csv, data.columns)
    if data.check_images:
        for source, part in df.groupby("source", sort=False):
            check_files_exist(part["image_path"], part["image_name"], f"source {source!r}")
    return df[MERGED_COLUMNS]


def load_test(data: DataConfig) -> pd.DataFrame:
    """The test CSV with the path and metadata of each image, checked like the training table."""
    c = data.columns
    df = read_csv(data.test_csv, [c.image])
    check_unique(df, c.image, data.test_csv)
    out = pd.DataFrame({
        "image_name": df[c.image],
        "sex": _optional(df, c.sex),
        "age_approx": pd.to_numeric(_optional(df, c.age), errors="coerce"),
        "anatom_site": _optional(df, c.site),
        "image_path": image_paths(df[c.image], data.test_images, data.image_ext),
    })
    check_files_exist(out["image_path"], out["image_name"], f"test set {data.test_csv}")
    return out

