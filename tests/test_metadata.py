import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import UserError
from pipeline.config import ModelConfig, TrainConfig, load_config
from pipeline.infer import run_infer
from pipeline.metadata import N_FEATURES, SITES, encode_metadata
from pipeline.model import MelanomaModel, load_model
from pipeline.predict import with_meta
from pipeline.train import fold_dir, train_all
from tests.conftest import make_tiny_set


def test_encoding_maps_2019_sites_and_flags_missing_values():
    df = pd.DataFrame({"sex": ["male", "female", None], "age_approx": [45.0, None, 70.0],
                       "anatom_site": ["posterior torso", "head/neck", None]})
    m = encode_metadata(df)
    assert m.shape == (3, N_FEATURES) and m.dtype == np.float32
    torso, head = 5 + SITES.index("torso"), 5 + SITES.index("head/neck")
    np.testing.assert_array_equal(m[:, :3], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(m[:, 3], [0.45, 0, 0.70])
    np.testing.assert_array_equal(m[:, 4], [0, 1, 0])
    no_site = 5 + len(SITES)
    assert m[0, torso] == 1 and m[1, head] == 1 and m[2, no_site] == 1 and m[2, 5:no_site].sum() == 0
    # a table without the columns (a test CSV without metadata): everything flagged missing
    bare = encode_metadata(pd.DataFrame({"image_name": ["a"]}))
    assert bare[0, 2] == 1 and bare[0, 4] == 1 and bare[0, no_site] == 1


def test_images_per_patient_and_jpeg_bytes(tmp_path):
    """The winners' two extra features: log1p(images of the patient) and log(JPEG bytes)."""
    paths = []
    for name, size in (("a", 100), ("b", 1000), ("c", 10000)):
        (tmp_path / f"{name}.jpg").write_bytes(b"x" * size)
        paths.append(str(tmp_path / f"{name}.jpg"))
    df = pd.DataFrame({"patient_id": ["P1", "P1", None], "image_path": paths})
    m = encode_metadata(df)
    np.testing.assert_allclose(m[:, -2], np.log1p([2, 2, 1]) / 5, rtol=1e-6)
    np.testing.assert_allclose(m[:, -1], np.log([100, 1000, 10000]) / 15, rtol=1e-6)
    df.loc[2, "image_path"] = str(tmp_path / "gone.jpg")
    with pytest.raises(UserError, match="gone.jpg"):
        encode_metadata(df)


def test_dropout_applied_once_and_multi_sample_head():
    """timm's own head dropout stays off; the head drops features once (or averages N masks)."""
    model = MelanomaModel.from_configs(
        ModelConfig(backbone="test_efficientnet", metadata=True, drop_rate=0.4), TrainConfig())
    assert model.net.drop_rate == 0
    features = torch.ones(2000, model.net.num_features)
    model.head.train()
    dropped = model.head.drop(features)
    assert abs((dropped == 0).float().mean().item() - 0.4) < 0.02  # 40%, not 64%
    multi = MelanomaModel.from_configs(
        ModelConfig(backbone="test_efficientnet", dropout_samples=5, drop_rate=0.5), TrainConfig())
    multi.head.train()
    torch.manual_seed(0)
    x = torch.randn(64, multi.net.num_features)
    one = multi.head.fc(multi.head.drop(x))
    five = multi.head(x)
    # averaging 5 masks shrinks the dropout noise around the eval output
    exact = multi.head.fc(x)
    assert (five - exact).pow(2).mean() < 0.5 * (one - exact).pow(2).mean()
    multi.head.eval()
    assert torch.allclose(multi.head(x), exact)


def test_metadata_model_needs_meta_and_stacked_views_get_it_repeated():
    model = MelanomaModel.from_configs(ModelConfig(backbone="test_efficientnet", metadata=True),
                                       TrainConfig()).eval()
    x = torch.randn(3, 3, 32, 32)
    meta = torch.from_numpy(encode_metadata(pd.DataFrame({"sex": ["male", "female", None]})))
    with pytest.raises(ValueError, match="model.metadata=true"):
        model(x)
    with torch.no_grad():
        one = model(x, meta)
        stacked = with_meta(model, meta)(torch.cat([x, x.flip(3)]))
        assert torch.allclose(stacked[:3], one, atol=1e-5)
        assert torch.allclose(stacked[3:], model(x.flip(3), meta), atol=1e-5)
        # the metadata reaches the logit
        assert not torch.allclose(model(x, meta), model(x, meta.flip(0)))


def test_fit_and_tta_inference_with_metadata(tmp_path):
    folds, overrides = make_tiny_set(tmp_path)
    folds[["image_name", "sex", "age_approx"]].iloc[::4].rename(
        columns={}).to_csv(tmp_path / "test.csv", index=False)
    cfg = load_config(None, overrides + [
        "model.metadata=true", "train.epochs=1", f"data.test_csv={tmp_path}/test.csv",
        f"data.test_images={tmp_path}/jpeg", f"infer.submissions_dir={tmp_path}/subs",
        f"ensemble.output={tmp_path}/subs/ensemble.csv", "infer.views=[identity,rot90]"])
    summary = train_all(cfg)
    assert 0 <= summary["oof_auc"] <= 1
    model = load_model(str(fold_dir(cfg, 0) / "best.ckpt"), cfg.model)
    assert model.head.meta is not None
    out = pd.read_csv(run_infer(cfg))
    assert len(out) == len(folds) // 4 and out["target"].between(0, 1).all()


def test_external_rows_count_one_image_per_patient():
    """As in the winners' code: only 2020 patients are counted; a lesion group is no patient."""
    df = pd.DataFrame({"patient_id": ["IP_1", "IP_1", "lesion:L1", "lesion:L1"],
                       "source": ["isic2020", "isic2020", "isic2019", "isic2019"]})
    from pipeline.metadata import images_per_patient
    np.testing.assert_array_equal(images_per_patient(df), [2, 2, 1, 1])


def test_head_fits_backbones_with_a_pre_logits_stage():
    """MobileNetV3 pools to 288 features but returns 1024 after its pre-logits layer."""
    model = MelanomaModel.from_configs(ModelConfig(backbone="mobilenetv3_small_050"), TrainConfig()).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2,)
