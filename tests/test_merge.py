from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import UserError
from pipeline.config import DataConfig, ExternalConfig, load_config
from pipeline.merge import MERGED_COLUMNS, load_test, merge_tables

TRAIN_HEADER = "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target\n"


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def touch_images(folder: Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / f"{n}.jpg").write_bytes(b"\xff\xd8 stand-in \xff\xd9")


def data_cfg(tmp_path, train_rows, external=None, dup=None) -> DataConfig:
    cfg = DataConfig(
        train_csv=write(tmp_path / "train.csv", TRAIN_HEADER + train_rows),
        train_images=str(tmp_path / "jpeg/train"),
        duplicates_csv=dup,
        external=external or [],
    )
    names = [r.split(",")[0] for r in train_rows.strip().splitlines()]
    touch_images(tmp_path / "jpeg/train", names)
    return cfg


ROWS = (
    "ISIC_1,IP_1,male,45.0,torso,nevus,benign,0\n"
    "ISIC_2,IP_1,male,45.0,torso,melanoma,malignant,1\n"
    "ISIC_3,IP_2,female,,head/neck,unknown,benign,0\n"
    "ISIC_4,,female,30.0,,unknown,benign,0\n"
)


def external(tmp_path) -> ExternalConfig:
    gt = write(tmp_path / "ext/gt.csv",
               "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
               "ISIC_9001,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
               "ISIC_9002,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
               "ISIC_9003,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0\n")
    meta = write(tmp_path / "ext/meta.csv",
                 "image,age_approx,anatom_site_general,lesion_id,sex\n"
                 "ISIC_9001,55,anterior torso,L1,female\n"
                 "ISIC_9002,60,anterior torso,L1,female\n"
                 "ISIC_9003,70,lower extremity,,male\n")
    touch_images(tmp_path / "ext/jpeg", ["ISIC_9001", "ISIC_9002", "ISIC_9003"])
    return ExternalConfig(name="isic2019", ground_truth_csv=gt, metadata_csv=meta,
                          images=str(tmp_path / "ext/jpeg"))


def test_merge_columns_sources_and_lesion_grouping(tmp_path):
    df = merge_tables(data_cfg(tmp_path, ROWS, external=[external(tmp_path)]))
    assert list(df.columns) == MERGED_COLUMNS
    assert len(df) == 7
    ext = df[df.source == "isic2019"].set_index("image_name")
    assert ext.loc["ISIC_9001", "patient_id"] == ext.loc["ISIC_9002", "patient_id"] == "lesion:L1"
    assert ext.loc["ISIC_9003", "patient_id"] == "image:ISIC_9003"
    assert list(ext["target"]) == [1, 0, 0]
    assert list(ext["diagnosis"]) == ["MEL", "NV", "BCC"]
    comp = df[df.source == "isic2020"].set_index("image_name")
    assert comp.loc["ISIC_4", "patient_id"] == "image:ISIC_4"  # missing patient → own group
    assert comp.loc["ISIC_2", "anatom_site"] == "torso"
    assert comp.loc["ISIC_1", "image_path"].endswith("jpeg/train/ISIC_1.jpg")


def test_duplicates_dropped(tmp_path):
    dup = write(tmp_path / "dups.csv", "image_name_1,image_name_2\nISIC_1,ISIC_3\n")
    df = merge_tables(data_cfg(tmp_path, ROWS, dup=dup))
    assert set(df.image_name) == {"ISIC_1", "ISIC_2", "ISIC_4"}


def test_gender_header_read_as_sex(tmp_path, real_data, caplog):
    """The real ISIC 2019 metadata copy heads its sex column `gender`: read without a setting."""
    ext_dir = real_data / "external"
    cfg = load_config(None, [
        f"data.train_csv={real_data / 'train.csv'}", "data.check_images=false",
    ])
    cfg.data.external = [ExternalConfig(
        ground_truth_csv=str(ext_dir / "ISIC_2019_Training_GroundTruth.csv"),
        metadata_csv=str(ext_dir / "ISIC_2019_Training_Metadata.csv"))]
    df = merge_tables(cfg.data)
    ext = df[df.source == "isic2019"]
    assert len(ext) == 25331 and ext["sex"].notna().mean() > 0.9
    assert ext["target"].sum() == 4522
    assert ext["patient_id"].str.startswith("lesion:").sum() > 10000
    assert ext["group_known"].all()  # every image is listed in ISIC's metadata
    raw = pd.read_csv(ext_dir / "ISIC_2019_Training_Metadata.csv")
    assert ext["sex"].notna().sum() == raw["gender"].notna().sum()


def merged_style_external(tmp_path, lesion_rows: str | None) -> ExternalConfig:
    """The merged 512-px re-encode's layout: 2020 columns, no lesion ids; lesions by image name."""
    gt = write(tmp_path / "ext/train.csv",
               "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,target\n"
               "ISIC_9001,-1,female,55,torso,MEL,1\n"
               "ISIC_9002,-1,female,55,torso,NV,0\n"
               "ISIC_9003,-1,male,70,torso,NV,0\n"
               "ISIC_9004,-1,male,70,torso,BCC,0\n")
    touch_images(tmp_path / "ext/jpeg", ["ISIC_9001", "ISIC_9002", "ISIC_9003", "ISIC_9004"])
    lesions = None if lesion_rows is None else write(
        tmp_path / "ext/ISIC_2019_Training_Metadata.csv",
        "image,age_approx,anatom_site_general,lesion_id,gender\n" + lesion_rows)
    return ExternalConfig(name="isic2019", ground_truth_csv=gt, metadata_csv=None,
                          images=str(tmp_path / "ext/jpeg"), lesions_csv=lesions)


def merged_columns():
    return ["data.columns.ext_image=image_name", "data.columns.ext_target=target",
            "data.columns.ext_site=anatom_site_general_challenge"]


def test_lesion_groups_from_isic_metadata_by_image_name(tmp_path, caplog):
    ext = merged_style_external(tmp_path, "ISIC_9001,55,torso,L1,female\n"
                                          "ISIC_9002,55,torso,L1,female\n"
                                          "ISIC_9003,70,torso,,male\n")
    cfg = data_cfg(tmp_path, ROWS, external=[ext])
    cfg.columns = load_config(None, merged_columns()).data.columns
    with caplog.at_level("INFO"):
        df = merge_tables(cfg).set_index("image_name")
    assert df.loc["ISIC_9001", "patient_id"] == df.loc["ISIC_9002", "patient_id"] == "lesion:L1"
    assert df.loc["ISIC_9003", "patient_id"] == "image:ISIC_9003"
    assert list(df.loc[["ISIC_9001", "ISIC_9003", "ISIC_9004"], "group_known"]) == [True, True, False]
    # the merge audit says how many external images have a lesion group
    assert "4 image(s): 2 in 1 lesion group(s); 1 listed" in caplog.text
    assert "1 not listed" in caplog.text


def test_lesion_csv_without_its_columns_is_an_error(tmp_path):
    ext = merged_style_external(tmp_path, None)
    ext.lesions_csv = write(tmp_path / "lesions.csv", "image_name,lesion\nISIC_9001,L1\n")
    cfg = data_cfg(tmp_path, ROWS, external=[ext])
    cfg.columns = load_config(None, merged_columns()).data.columns
    with pytest.raises(UserError, match=r"lesions.csv: missing required column\(s\) \['image', 'lesion_id'\]"):
        merge_tables(cfg)


def test_metadata_without_lesion_column_warns_and_leaves_groups_unknown(tmp_path, caplog):
    ext = external(tmp_path)
    write(Path(ext.metadata_csv), "image,age_approx,anatom_site_general,sex\n"
                                  "ISIC_9001,55,anterior torso,female\n"
                                  "ISIC_9002,60,anterior torso,female\n"
                                  "ISIC_9003,70,lower extremity,male\n")
    with caplog.at_level("WARNING"):
        df = merge_tables(data_cfg(tmp_path, ROWS, external=[ext]))
    assert "meta.csv: no column 'lesion_id'" in caplog.text and "lesions_csv" in caplog.text
    ext_rows = df[df.source == "isic2019"]
    assert not ext_rows["group_known"].any()
    assert ext_rows["patient_id"].str.startswith("image:").all()


def test_missing_optional_column_warns_with_the_file_and_its_columns(tmp_path, caplog):
    header = "image_name,patient_id,age_approx,target\n"
    cfg = DataConfig(train_csv=write(tmp_path / "train.csv", header + "ISIC_1,IP_1,45,0\n"),
                     train_images=str(tmp_path / "jpeg/train"))
    touch_images(tmp_path / "jpeg/train", ["ISIC_1"])
    with caplog.at_level("WARNING"):
        merge_tables(cfg)
    assert "train.csv: no column 'sex'" in caplog.text
    assert "no column 'anatom_site_general_challenge'" in caplog.text
    assert "['image_name', 'patient_id', 'age_approx', 'target']" in caplog.text


def test_external_images_without_metadata_rows_are_named(tmp_path, caplog):
    ext = external(tmp_path)
    write(Path(ext.metadata_csv), "image,age_approx,anatom_site_general,lesion_id,sex\n"
                                  "ISIC_9001,55,anterior torso,L1,female\n")
    with caplog.at_level("WARNING"):
        df = merge_tables(data_cfg(tmp_path, ROWS, external=[ext]))
    assert "2 image(s)" in caplog.text and "ISIC_9002, ISIC_9003" in caplog.text
    assert list(df.loc[df.source == "isic2019", "group_known"]) == [True, False, False]


@pytest.mark.parametrize("rows,match", [
    ("ISIC_1,IP_1,male,45.0,torso,nevus,benign,0\nISIC_1,IP_1,male,45.0,torso,nevus,benign,0\n",
     r"duplicate value.*ISIC_1.*line\(s\) 2, 3"),
    ("ISIC_1,IP_1,male,45.0,torso,nevus,benign,2\nISIC_2,IP_1,male,45.0,torso,nevus,benign,x\n",
     r"'target' must be 0 or 1; 2 row\(s\).*line\(s\) 2, 3"),
])
def test_bad_rows_named(tmp_path, rows, match):
    with pytest.raises(UserError, match=match) as err:
        merge_tables(data_cfg(tmp_path, rows))
    assert "train.csv" in str(err.value)


def test_missing_column_and_empty_csv(tmp_path):
    cfg = DataConfig(train_csv=write(tmp_path / "t.csv", "image_name,target\nA,0\n"))
    with pytest.raises(UserError, match=r"t.csv: missing required column\(s\) \['patient_id'\]"):
        merge_tables(cfg)
    cfg = DataConfig(train_csv=write(tmp_path / "e.csv", ""))
    with pytest.raises(UserError, match="e.csv: the file is empty"):
        merge_tables(cfg)
    cfg = DataConfig(train_csv=write(tmp_path / "h.csv", TRAIN_HEADER))
    with pytest.raises(UserError, match="h.csv: has a header but no rows"):
        merge_tables(cfg)


def test_all_missing_images_reported(tmp_path):
    cfg = data_cfg(tmp_path, ROWS)
    for name in ("ISIC_2", "ISIC_4"):
        (tmp_path / "jpeg/train" / f"{name}.jpg").unlink()
    with pytest.raises(UserError, match=r"2 of 4 listed image\(s\) missing.*ISIC_2, ISIC_4"):
        merge_tables(cfg)


def test_test_set_paths_checked(tmp_path):
    cfg = DataConfig(test_csv=write(tmp_path / "test.csv", "image_name,patient_id\nT1,P\nT2,P\n"),
                     test_images=str(tmp_path / "jpeg/test"))
    touch_images(tmp_path / "jpeg/test", ["T1"])
    with pytest.raises(UserError, match=r"1 of 2 listed image\(s\) missing.*T2"):
        load_test(cfg)
    touch_images(tmp_path / "jpeg/test", ["T2"])
    assert list(load_test(cfg)["image_name"]) == ["T1", "T2"]


def test_name_clash_between_sets(tmp_path):
    ext = external(tmp_path)
    rows = ROWS + "ISIC_9001,IP_9,male,45.0,torso,nevus,benign,0\n"
    with pytest.raises(UserError, match="ISIC_9001"):
        merge_tables(data_cfg(tmp_path, rows, external=[ext]))
    assert pd.read_csv(ext.ground_truth_csv).shape[0] == 3


def test_downloaded_external_layout_from_shipped_config(real_data):
    """configs/effnet_b5_512.yaml reads the merged external set's train.csv (2020 columns)."""
    from tests.conftest import REPO
    cfg = load_config(REPO / "configs/effnet_b5_512.yaml", [
        f"data.train_csv={real_data / 'train.csv'}", "data.check_images=false",
        "data.duplicates_csv=null"])
    cfg.data.external[0].ground_truth_csv = str(
        real_data / "external/train_cdeotte_jpeg-isic2019_tfrecord_folds.csv")
    cfg.data.external[0].lesions_csv = str(real_data / "external/ISIC_2019_Training_Metadata.csv")
    df = merge_tables(cfg.data)
    ext = df[df.source == "isic2019"]
    raw = pd.read_csv(cfg.data.external[0].ground_truth_csv)
    assert len(ext) == len(raw) and ext["target"].sum() == raw["target"].sum()
    assert not ext["patient_id"].isin(["-1", "lesion:-1"]).any()  # patient_id -1 is not a patient
    # lesion ids joined by image name from ISIC's metadata: enough for spread mode
    assert ext["group_known"].mean() >= 0.95
    assert ext["patient_id"].str.startswith("lesion:").sum() > 20000
    assert ext["diagnosis"].notna().mean() > 0.99 and ext["anatom_site"].notna().mean() > 0.8
