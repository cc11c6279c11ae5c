import pytest

from pipeline.config import ConfigError, config_hash, load_config, save_config, to_yaml
from tests.conftest import REPO


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: x\nfolds:\n  n_folds: 3\n")
    cfg = load_config(path, ["folds.n_folds=4", "train.lr=0.01"])
    assert cfg.experiment == "x"
    assert cfg.folds.n_folds == 4
    assert cfg.train.lr == 0.01
    assert cfg.folds.seed == 42  # untouched default


@pytest.mark.parametrize("text,key", [
    ("folds:\n  n_foldz: 3\n", "folds.n_foldz"),
    ("bogus: 1\n", "bogus"),
    ("folds:\n  n_folds: three\n", "folds.n_folds"),
])
def test_bad_yaml_names_key_and_file(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_bad_override_names_key():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.epochs"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


@pytest.mark.parametrize("name", ["demo.yaml", "effnet_b5_512.yaml"])
def test_shipped_configs_load(name):
    import timm

    cfg = load_config(REPO / "configs" / name)
    assert timm.is_model(cfg.model.backbone)


def test_blog_settings():
    cfg = load_config(REPO / "configs" / "effnet_b5_512.yaml")
    assert (cfg.model.backbone, cfg.data.image_size, cfg.data.crop_size) == ("efficientnet_b5", 512, 456)
    assert (cfg.train.epochs, cfg.train.pct_start, cfg.train.div_factor) == (7, 0.1, 10.0)
    assert cfg.train.final_div_factor == 100.0 and cfg.train.precision == "16-mixed"
    assert cfg.train.label_smoothing == 0.05 and cfg.folds.n_folds == 5


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "experiment=e"])
    path = save_config(cfg, tmp_path)
    again = load_config(path)
    assert to_yaml(again) == to_yaml(cfg)
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["train.epochs=4"])) != config_hash(cfg)
