import numpy as np
import pandas as pd
import pytest
import torch

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
    assert m[0, torso] == 1 and m[1, head] == 1 and m[2, -1] == 1 and m[2, 5:-1].sum() == 0
    # a table without the columns (a test CSV without metadata): everything flagged missing
    bare = encode_metadata(pd.DataFrame({"image_name": ["a"]}))
    assert bare[0, 2] == 1 and bare[0, 4] == 1 and bare[0, -1] == 1


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
    assert model.meta_head is not None
    out = pd.read_csv(run_infer(cfg))
    assert len(out) == len(folds) // 4 and out["target"].between(0, 1).all()
