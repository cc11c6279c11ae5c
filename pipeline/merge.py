"""Merge the 2020 training CSV and optional ISIC-2019-style external sets into one table."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.config import ColumnsConfig, DataConfig, ExternalConfig
from pipeline.errors import UserError
from pipeline.tables import (
    check_binary,
    check_files_exist,
    check_unique,
    optional_column,
    read_csv,
    some,
)

log = logging.getLogger(__name__)

COMPETITION_SOURCE = "isic2020"
MERGED_COLUMNS = [
    "image_name", "patient_id", "target", "source", "sex", "age_approx", "anatom_site",
    "diagnosis", "image_path", "group_known",
]


def image_paths(names: pd.Series, folder: str, ext: str) -> pd.Series:
    return folder.rstrip("/") + "/" + names + ext


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
    return image_table(df, df[c.image], df[c.patient], COMPETITION_SOURCE, data.train_images, data, path)


def image_table(df: pd.DataFrame, names: pd.Series, groups: pd.Series, source, images: str,
                data: DataConfig, path: str) -> pd.DataFrame:
    """A training CSV's rows in the merged layout: the group of each image (missing: the image
    alone, and its grouping unknown), its target, and the metadata columns the file has."""
    c = data.columns
    known = groups.notna() & (groups.astype("string").str.strip() != "")
    return pd.DataFrame({
        "image_name": names,
        "patient_id": fill_patients(groups, names, path),
        "target": check_binary(df, c.target, path),
        "source": source,
        "sex": optional_column(df, c.sex, path),
        "age_approx": pd.to_numeric(optional_column(df, c.age, path), errors="coerce"),
        "anatom_site": optional_column(df, c.site, path),
        "diagnosis": optional_column(df, c.diagnosis, path),
        "image_path": image_paths(names, images, data.image_ext),
        "group_known": known.fillna(False).to_numpy(dtype=bool),
    })


def _external_diagnosis(gt: pd.DataFrame, c: ColumnsConfig, path: str) -> np.ndarray:
    """The one-hot diagnosis columns' name (ISIC 2019 ground truth), else a `diagnosis` column."""
    dx_cols = [d for d in c.ext_diagnoses if d in gt.columns]
    if not dx_cols:
        return optional_column(gt, c.diagnosis, path).to_numpy()
    dx = gt[dx_cols].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy()
    return np.where(dx.max(axis=1) > 0, np.array(dx_cols)[dx.argmax(axis=1)], None)


LISTED = "_listed"  # metadata column: the image has a row in the metadata file


def _metadata(ext: ExternalConfig, gt: pd.DataFrame, c: ColumnsConfig) -> tuple[pd.DataFrame, str]:
    """Metadata rows aligned with the ground truth's images, and the file they came from."""
    if not ext.metadata_csv:  # the ground-truth file holds the metadata (the merged re-encode)
        return gt.assign(**{LISTED: True}), ext.ground_truth_csv
    meta = read_csv(ext.metadata_csv, [c.ext_image])
    check_unique(meta, c.ext_image, ext.metadata_csv)
    aligned = gt[[c.ext_image]].merge(meta, on=c.ext_image, how="left", indicator=LISTED)
    aligned[LISTED] = aligned[LISTED] == "both"
    absent = aligned.loc[~aligned[LISTED], c.ext_image]
    if len(absent):
        log.warning("%s: %d image(s) of %s have no metadata row: %s", ext.metadata_csv, len(absent),
                    ext.ground_truth_csv, some(absent))
    return aligned, ext.metadata_csv


def _lesion_table(ext: ExternalConfig, meta: pd.DataFrame, meta_path: str,
                  c: ColumnsConfig) -> tuple[pd.DataFrame | None, str]:
    """(image, lesion) rows that say how images group into lesions, and their file; None when
    no file names lesions (a warning then says so)."""
    if ext.lesions_csv:
        table = read_csv(ext.lesions_csv, [c.lesion_image, c.ext_lesion])
        check_unique(table, c.lesion_image, ext.lesions_csv)
        return table.rename(columns={c.lesion_image: "image"})[["image", c.ext_lesion]], ext.lesions_csv
    if c.ext_lesion not in meta.columns:
        log.warning(
            "%s: no column %r, so the %s images cannot be grouped by lesion: each is its own group "
            "(folds.external=spread is refused). Name ISIC's ISIC_2019_Training_Metadata.csv in "
            "data.external[].lesions_csv. Columns found: %s",
            meta_path, c.ext_lesion, ext.name, [k for k in meta.columns if k != LISTED])
        return None, meta_path
    listed = meta[meta[LISTED]].rename(columns={c.ext_image: "image"})
    return listed[["image", c.ext_lesion]], meta_path


def lesion_groups(names: pd.Series, table: pd.DataFrame | None, lesion_col: str, source: str,
                  path: str) -> tuple[pd.Series, np.ndarray]:
    """Group id of each image (`lesion:<id>`, else `image:<name>`) and whether its grouping is known
    (the image is listed in the lesion file, with or without a lesion id)."""
    if table is None:
        lesion = pd.Series(pd.NA, index=names.index, dtype="string")
        listed = np.zeros(len(names), bool)
    else:
        by_image = table.set_index("image")[lesion_col].astype("string").str.strip()
        lesion = names.map(by_image).astype("string")
        lesion = lesion.where(lesion != "", pd.NA)
        listed = names.isin(table["image"]).to_numpy()
    grouped = lesion.notna()
    log.info(
        "%s: %d image(s): %d in %d lesion group(s); %d listed in %s without a lesion id and %d not "
        "listed there (each its own group); grouping known for %.1f%%", source, len(names),
        int(grouped.sum()), lesion[grouped].nunique(), int((listed & ~grouped.to_numpy()).sum()),
        path, int((~listed).sum()), 100 * listed.mean() if len(listed) else 0.0)
    return ("lesion:" + lesion).fillna("image:" + names).astype(str), listed


def load_external(ext: ExternalConfig, c: ColumnsConfig, image_ext: str) -> pd.DataFrame:
    """An ISIC 2019 style set: one-hot ground truth plus optional metadata.

    External images have no patient: they are grouped by lesion (from the metadata's lesion ids,
    or `lesions_csv` by image name), else each by itself.
    """
    gt_path = ext.ground_truth_csv
    gt = read_csv(gt_path, [c.ext_image, c.ext_target])
    check_unique(gt, c.ext_image, gt_path)
    target = check_binary(gt, c.ext_target, gt_path)
    diagnosis = _external_diagnosis(gt, c, gt_path)
    meta, meta_path = _metadata(ext, gt, c)
    table, table_path = _lesion_table(ext, meta, meta_path, c)
    meta = meta.drop(columns=LISTED)  # an internal flag: not one of the file's columns
    groups, listed = lesion_groups(gt[c.ext_image], table, c.ext_lesion, ext.name, table_path)
    return pd.DataFrame({
        "image_name": gt[c.ext_image],
        "patient_id": groups.to_numpy(),
        "target": target,
        "source": ext.name,
        "sex": optional_column(meta, c.ext_sex, meta_path).to_numpy(),
        "age_approx": pd.to_numeric(optional_column(meta, c.ext_age, meta_path), errors="coerce").to_numpy(),
        "anatom_site": optional_column(meta, c.ext_site, meta_path).to_numpy(),
        "diagnosis": diagnosis,
        "image_path": image_paths(gt[c.ext_image], ext.images, image_ext),
        "group_known": listed,
    })


def drop_duplicates(df: pd.DataFrame, path: str, c: ColumnsConfig) -> pd.DataFrame:
    """Drop the second image of each known duplicate pair (ISIC's list), keeping the first."""
    pairs = read_csv(path, [c.dup_image, c.dup_other])
    drop = set(pairs[c.dup_other]) - set(pairs[c.dup_image])
    unknown = sorted(drop - set(df["image_name"]))
    if unknown:
        log.warning("%s: %d of the %d image(s) it marks as duplicates are in no input set (another "
                    "competition's list?): %s", path, len(unknown), len(drop), some(unknown))
    keep = ~df["image_name"].isin(drop)
    log.info("%s: dropped %d duplicate image(s)", path, int((~keep).sum()))
    return df[keep].reset_index(drop=True)


def load_merged(data: DataConfig) -> pd.DataFrame:
    """A merged CSV (`data.merged`), split by its source column: the 2020 rows keep their patients;
    the other rows are grouped by their patient column where it holds an id (the merged set puts
    ISIC 2019's lesion id there), else each image alone, with its grouping unknown."""
    m, c = data.merged, data.columns
    path = m.csv
    df = read_csv(path, [m.image, m.source, c.target])
    check_unique(df, m.image, path)
    is_2020 = (df[m.source] == m.competition_source).to_numpy()
    if not is_2020.any():
        raise UserError(f"{path}: no row has {m.source}={m.competition_source!r} (the 2020 images); "
                        f"values found: {some(sorted(df[m.source].dropna().unique()))}")
    patient = optional_column(df, m.patient, path).astype("string").str.strip()
    patient = patient.where(patient.notna() & (patient != ""), pd.NA)
    groups = patient.where(is_2020, "lesion:" + patient)  # external rows: lesion ids, not patients
    sources = np.where(is_2020, COMPETITION_SOURCE, df[m.source].astype(str))
    out = image_table(df, df[m.image], groups, sources, m.images, data, path)
    for source, part in out.groupby("source", sort=False):
        log.info("%s: %s: %d image(s), %d positive, %d with a patient or lesion id", path, source,
                 len(part), int(part["target"].sum()), int(part["group_known"].sum()))
    return out


def merge_tables(data: DataConfig) -> pd.DataFrame:
    """One table of every training image: 2020 first, then each external set, duplicates removed.
    With `data.merged` set, its one CSV replaces the 2020 CSV and the external sets."""
    if data.merged is not None:
        log.info("reading the training images from %s (data.merged); data.train_csv and "
                 "data.external are not read", data.merged.csv)
        parts = [load_merged(data)]
    else:
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
    path = data.test_csv
    out = pd.DataFrame({
        "image_name": df[c.image],
        "patient_id": fill_patients(optional_column(df, c.patient, path), df[c.image], path),
        "sex": optional_column(df, c.sex, path),
        "age_approx": pd.to_numeric(optional_column(df, c.age, path), errors="coerce"),
        "anatom_site": optional_column(df, c.site, path),
        "image_path": image_paths(df[c.image], data.test_images, data.image_ext),
    })
    check_files_exist(out["image_path"], out["image_name"], f"test set {data.test_csv}")
    return out

