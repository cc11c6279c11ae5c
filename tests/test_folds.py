import pandas as pd
import pytest

from pipeline.cli import UserError
from pipeline.config import ExternalConfig, FoldsConfig, load_config
from pipeline.folds import SIZE_BINS, audit, balance, check_folds, describe, make_folds, run_folds
from pipeline.merge import merge_tables


def real_table(real_data, duplicates=False):
    overrides = [f"data.train_csv={real_data / 'train.csv'}", "data.check_images=false"]
    if duplicates:
        overrides.append(f"data.duplicates_csv={real_data / 'ISIC_2020_Training_Duplicates.csv'}")
    return merge_tables(load_config(None, overrides).data)


def table(patients, positives, seed=0):
    """A merged-style table: patient sizes and positives per patient."""
    rows = []
    for p, (n, k) in enumerate(zip(patients, positives, strict=True)):
        rows += [(f"IMG_{p}_{i}", f"IP_{p}", int(i < k), "isic2020") for i in range(n)]
    df = pd.DataFrame(rows, columns=["image_name", "patient_id", "target", "source"])
    return df.assign(group_known=True)


@pytest.fixture(scope="module")
def real_folds(request):
    from tests.conftest import REAL
    if not (REAL / "train.csv").is_file():
        pytest.skip("real data absent")
    return make_folds(real_table(REAL), FoldsConfig(n_folds=5, seed=42))


def test_real_no_patient_in_two_folds(real_folds):
    assert len(real_folds) == 33126
    assert real_folds.groupby("patient_id")["fold"].nunique().max() == 1
    check_folds(real_folds)


def test_real_positive_rate_and_sizes_balanced(real_folds):
    a = audit(real_folds)
    overall = 100 * real_folds["target"].mean()
    assert abs(overall - 1.763) < 0.01
    assert (a["pos_rate_%"] - overall).abs().max() < 0.1
    assert a["images"].max() / a["images"].min() - 1 < 0.02
    # the mix of patient sizes: similar patients per fold, not a few huge ones in one fold
    assert a["patients"].max() - a["patients"].min() <= 0.05 * a["patients"].mean()


def test_real_with_duplicates_dropped(real_data):
    folds = make_folds(real_table(real_data, duplicates=True), FoldsConfig(n_folds=5))
    assert len(folds) == 33126 - 425
    check_folds(folds)


def test_same_seed_same_folds_other_seed_other_folds(real_folds):
    from tests.conftest import REAL
    again = make_folds(real_table(REAL), FoldsConfig(n_folds=5, seed=42))
    assert again["fold"].equals(real_folds["fold"])
    other = make_folds(real_table(REAL), FoldsConfig(n_folds=5, seed=7))
    assert not other["fold"].equals(real_folds["fold"])
    check_folds(other)


def test_byte_identical_file(tmp_path, real_data):
    outs = []
    for name in ("a", "b"):
        cfg = load_config(None, [f"data.train_csv={real_data / 'train.csv'}",
                                 "data.check_images=false", f"folds.output={tmp_path}/{name}.csv"])
        run_folds(cfg)
        outs.append((tmp_path / f"{name}.csv").read_bytes())
    assert outs[0] == outs[1]


def test_one_patient_holding_most_positives_stays_whole(caplog):
    sizes = [40] + [5] * 30
    positives = [30] + [1] * 6 + [0] * 24
    with caplog.at_level("WARNING"):
        folds = make_folds(table(sizes, positives), FoldsConfig(n_folds=3))
    check_folds(folds)
    assert folds.loc[folds.patient_id == "IP_0", "fold"].nunique() == 1
    assert "one patient holds 30" in caplog.text
    assert set(folds["fold"]) == {0, 1, 2}


def test_more_folds_than_positive_patients_is_a_clear_error():
    df = table([5] * 10, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(UserError, match="only 2 patient.*positive"):
        make_folds(df, FoldsConfig(n_folds=3))


def test_external_train_only_or_spread():
    df = table([4] * 12, [1] * 6 + [0] * 6)
    ext = table([2] * 6, [1] * 3 + [0] * 3).assign(source="isic2019")
    ext["patient_id"] = "lesion:" + ext["patient_id"]
    ext["image_name"] = "X" + ext["image_name"]
    both = pd.concat([df, ext], ignore_index=True)
    train_only = make_folds(both, FoldsConfig(n_folds=3))
    assert (train_only.loc[train_only.source == "isic2019", "fold"] == -1).all()
    assert (train_only.loc[train_only.source == "isic2020", "fold"] >= 0).all()
    spread = make_folds(both, FoldsConfig(n_folds=3, external="spread"))
    assert set(spread.loc[spread.source == "isic2019", "fold"]) == {0, 1, 2}
    check_folds(spread)
    with pytest.raises(UserError, match="folds.external"):
        make_folds(both, FoldsConfig(external="sometimes"))


def test_spread_refused_without_lesion_groups():
    df = table([4] * 12, [1] * 6 + [0] * 6)
    ext = table([1] * 20, [1] * 5 + [0] * 15).assign(source="isic2019")
    ext["image_name"] = "X" + ext["image_name"]
    ext["patient_id"] = "image:" + ext["image_name"]
    ext["group_known"] = [True] * 19 + [False]  # 95% known: accepted
    both = pd.concat([df, ext], ignore_index=True)
    make_folds(both, FoldsConfig(n_folds=3, external="spread"))
    both.loc[both.index[-2], "group_known"] = False  # 90%: refused, with the fix named
    with pytest.raises(UserError, match=r"only 90.0% of the 'isic2019' images.*lesions_csv"):
        make_folds(both, FoldsConfig(n_folds=3, external="spread"))
    make_folds(both, FoldsConfig(n_folds=3))  # train_only needs no lesion groups


def test_real_folds_meet_the_balance_targets(real_data):
    """Duplicates dropped: images within 0.05%, positive rate within 0.02 pp, patients within one,
    each patient-size bin within 2 points of the smallest spread integer counts allow."""
    folds = make_folds(real_table(real_data, duplicates=True), FoldsConfig(n_folds=5, seed=42))
    b = balance(folds)
    assert b["image_spread_%"] <= 0.05
    assert b["pos_rate_spread_pp"] <= 0.02
    assert b["patient_spread"] <= 1
    for name in SIZE_BINS:
        assert b[f"bin_{name}_spread_%"] <= b[f"bin_{name}_floor_%"] + 2, name


def test_spread_mode_on_real_isic2019_metadata(real_data):
    """External images spread over folds by ISIC's lesion ids: no lesion or patient split, and
    the 2020 images alone as balanced as in train-only mode."""
    ext_dir = real_data / "external"
    cfg = load_config(None, [
        f"data.train_csv={real_data / 'train.csv'}", "data.check_images=false",
        f"data.duplicates_csv={real_data / 'ISIC_2020_Training_Duplicates.csv'}",
        "folds.external=spread"])
    cfg.data.external = [ExternalConfig(
        ground_truth_csv=str(ext_dir / "ISIC_2019_Training_GroundTruth.csv"),
        metadata_csv=str(ext_dir / "ISIC_2019_Training_Metadata.csv"))]
    folds = make_folds(merge_tables(cfg.data), cfg.folds)
    check_folds(folds)
    meta = pd.read_csv(ext_dir / "ISIC_2019_Training_Metadata.csv").dropna(subset=["lesion_id"])
    per_lesion = meta.merge(folds, left_on="image", right_on="image_name").groupby("lesion_id")["fold"]
    assert per_lesion.nunique().max() == 1 and per_lesion.ngroups == 11847
    assert (folds["fold"] >= 0).all()
    b2020 = balance(folds[folds.source == "isic2020"])
    assert b2020["image_spread_%"] <= 0.5
    assert b2020["pos_rate_spread_pp"] <= 0.03
    assert b2020["patient_spread"] <= 1
    assert balance(folds)["pos_rate_spread_pp"] <= 0.03
    text = describe(folds)
    assert "all rows:" in text and "2020 images alone:" in text and "pt_81+" in text


def test_audit_counts_sources():
    df = make_folds(table([3] * 9, [1] * 3 + [0] * 6), FoldsConfig(n_folds=3))
    a = audit(df)
    assert a["images"].sum() == 27 and a["positives"].sum() == 3
    assert (a["n_isic2020"] == a["images"]).all()



def test_missing_patient_ids_become_own_groups(caplog):
    df = table([3] * 6, [1, 1, 1, 0, 0, 0])
    df.loc[[0, 1], "patient_id"] = None
    with caplog.at_level("WARNING"):
        folds = make_folds(df, FoldsConfig(n_folds=3))
    assert "2 row(s) without a patient id" in caplog.text
    assert folds["fold"].between(0, 2).all()
    assert folds.loc[0, "patient_id"] == "image:IMG_0_0"
    check_folds(folds)


def test_at_least_as_balanced_as_the_public_tfrecord_folds(real_folds, real_data):
    public = pd.read_csv(real_data / "train_cdeotte_jpeg-melanoma_tfrecord_folds.csv")
    public = public[public.tfrecord >= 0].assign(fold=lambda d: d.tfrecord % 5, source="isic2020")
    check_folds(public)
    ours, theirs = audit(real_folds), audit(public)
    spread = lambda a, col: a[col].max() - a[col].min()  # noqa: E731
    assert spread(ours, "pos_rate_%") <= spread(theirs, "pos_rate_%")
    assert spread(ours, "images") <= spread(theirs, "images")
