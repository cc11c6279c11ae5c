"""Nothing lost, nothing silent: torn manifests, full disks, corrupt checkpoints, bad inputs,
killed runs. Each case names the file, row or key, and leaves earlier outputs intact."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.atomic import atomic_write_csv
from pipeline.cli import UserError, user_message
from pipeline.config import ConfigError, load_config
from pipeline.infer import run_infer
from pipeline.merge import merge_tables
from pipeline.model import load_model
from pipeline.submissions import append_manifest, read_manifest, write_numbered
from pipeline.submit import check_submission
from pipeline.train import fold_dir, train_all
from tests.conftest import REPO, make_tiny_set, tiny_test_set

ROW = {"n": 1, "file": "submission1.csv", "experiment": "e", "fold": 0, "view": "identity"}


def run_limited(code: str, limit_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python whose files may not grow past `limit_bytes` (RLIMIT_FSIZE:
    writes beyond it fail with EFBIG, as on a full disk)."""
    prelude = ("import resource, sys\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n"
               f"sys.path.insert(0, {str(REPO)!r})\n")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=env)


# ---- manifest ----------------------------------------------------------------------------------


def test_torn_manifest_line_is_named_ignored_and_repaired(tmp_path, caplog):
    append_manifest(tmp_path, ROW)
    append_manifest(tmp_path, {**ROW, "n": 2, "file": "submission2.csv"})
    path = tmp_path / "manifest.csv"
    with open(path, "a") as f:
        f.write("3,s")  # a writer cut off mid-row
    with caplog.at_level("WARNING"):
        assert list(read_manifest(tmp_path)["n"]) == [1, 2]
    assert "manifest.csv: line 4 is unfinished" in caplog.text
    append_manifest(tmp_path, {**ROW, "n": 4, "file": "submission4.csv"})
    assert "removed an unfinished last line ('3,s')" in caplog.text
    assert list(read_manifest(tmp_path)["n"]) == [1, 2, 4]
    assert path.read_text().count("\n") == 4


def test_a_torn_header_or_an_empty_manifest_is_no_crash(tmp_path, caplog):
    path = tmp_path / "manifest.csv"
    path.write_text("")  # a first append that found no room
    assert read_manifest(tmp_path).empty
    path.write_text("n,file,exp")  # a header cut short
    with caplog.at_level("WARNING"):
        assert read_manifest(tmp_path).empty
        append_manifest(tmp_path, ROW)
    assert list(read_manifest(tmp_path)["n"]) == [1]
    path.write_text("something else\n1,2\n")
    with pytest.raises(UserError, match=r"manifest.csv: line 1 is 'something else', not the manifest header"):
        read_manifest(tmp_path)


def test_manifest_rows_whole_or_absent_when_the_disk_fills(tmp_path):
    append_manifest(tmp_path, ROW)
    size = (tmp_path / "manifest.csv").stat().st_size
    result = run_limited(f"""
        from pipeline.submissions import append_manifest
        from pipeline.cli import UserError
        try:
            for n in range(2, 100):
                append_manifest({str(tmp_path)!r}, {{"n": n, "file": f"submission{{n}}.csv", "experiment": "e"}})
        except UserError as err:
            print("ERROR", err)
        """, size + 300, tmp_path)
    assert "manifest.csv: cannot write it" in result.stdout
    assert "the row was not added, earlier rows are intact" in result.stdout
    data = (tmp_path / "manifest.csv").read_text()
    assert data.endswith("\n")  # no torn row
    manifest = read_manifest(tmp_path)
    assert list(manifest["n"]) == list(range(1, len(manifest) + 1)) and len(manifest) > 1


def test_no_temporary_file_left_when_a_submission_cannot_be_written(tmp_path):
    result = run_limited(f"""
        import pandas as pd
        from pipeline.submissions import write_numbered
        from pipeline.cli import UserError
        df = pd.DataFrame({{"image_name": [f"ISIC_{{i}}" for i in range(5000)], "target": 0.5}})
        try:
            write_numbered(df, {str(tmp_path)!r})
        except UserError as err:
            print("ERROR", err)
        """, 4096, tmp_path)
    assert "ERROR" in result.stdout and "submission<N>.csv: cannot write it" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_keeps_the_old_output_and_names_the_file(tmp_path):
    out = tmp_path / "folds.csv"
    atomic_write_csv(pd.DataFrame({"a": [1]}), out)
    before = out.read_bytes()
    result = run_limited(f"""
        import pandas as pd
        from pipeline.atomic import atomic_write_csv
        from pipeline.cli import UserError
        try:
            atomic_write_csv(pd.DataFrame({{"a": range(100000)}}), {str(out)!r})
        except UserError as err:
            print("ERROR", err)
        """, 8192, tmp_path)
    assert f"ERROR {out}: cannot write it (File too large); nothing was replaced" in result.stdout
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["folds.csv"]


def test_outputs_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_csv(pd.DataFrame({"a": [1]}), tmp_path / "a.csv")
        _, path = write_numbered(pd.DataFrame({"image_name": ["x"], "target": [0.1]}), tmp_path)
        append_manifest(tmp_path, ROW)
    finally:
        os.umask(old)
    for p in (tmp_path / "a.csv", path, tmp_path / "manifest.csv"):
        assert p.stat().st_mode & 0o777 == 0o640, p


# ---- checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    folds, overrides = make_tiny_set(root)
    overrides += tiny_test_set(root, folds) + ["train.epochs=1", "infer.views=[identity]", "infer.oof_tta=false"]
    cfg = load_config(None, overrides)
    train_all(cfg)
    run_infer(cfg)
    return root, overrides, cfg


@pytest.mark.parametrize("damage,what", [
    (lambda b: b"", "checkpoint is empty"),
    (lambda b: b[: len(b) // 2], "not a readable checkpoint"),
    (lambda b: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a readable checkpoint"),
])
def test_a_damaged_checkpoint_is_named(trained, tmp_path, damage, what):
    _, _, cfg = trained
    bad = tmp_path / "best.ckpt"
    bad.write_bytes(damage((fold_dir(cfg, 0) / "best.ckpt").read_bytes()))
    with pytest.raises(UserError, match=f"{bad}: {what}"):
        load_model(str(bad), cfg.model)


# ---- inference checks before it writes ---------------------------------------------------------


def test_test_ids_differing_from_the_sample_stop_inference_before_any_write(trained, tmp_path):
    root, overrides, cfg = trained
    ensemble = Path(cfg.ensemble.output)
    before, files = ensemble.read_bytes(), sorted(Path(cfg.infer.submissions_dir).iterdir())
    test = pd.read_csv(root / "test.csv").iloc[2:]
    test.to_csv(tmp_path / "short_test.csv", index=False)
    short = load_config(None, overrides + [f"data.test_csv={tmp_path}/short_test.csv"])
    with pytest.raises(UserError, match=r"short_test.csv: its image ids do not match .*2 id\(s\) .*missing"):
        run_infer(short)
    assert ensemble.read_bytes() == before
    assert sorted(Path(cfg.infer.submissions_dir).iterdir()) == files


def test_a_failing_ensemble_never_replaces_a_valid_one(trained, tmp_path):
    root, overrides, cfg = trained
    from pipeline.ensemble import run_ensemble
    ensemble = Path(cfg.ensemble.output)
    before = ensemble.read_bytes()
    sample = pd.read_csv(root / "sample.csv")
    pd.concat([sample, pd.DataFrame({"image_name": ["ISIC_extra"], "target": [0]})]).to_csv(
        tmp_path / "sample.csv", index=False)
    bad = load_config(None, overrides + [f"data.sample_submission={tmp_path}/sample.csv"])
    with pytest.raises(UserError, match=r"ensemble.csv: not replaced, the new file fails the check.*ISIC_extra"):
        run_ensemble(bad)
    assert ensemble.read_bytes() == before
    assert not list(ensemble.parent.glob(".ensemble.csv.*"))


def test_a_sample_submission_with_duplicated_ids_is_refused(trained, tmp_path):
    root, _, cfg = trained
    sample = pd.read_csv(root / "sample.csv")
    pd.concat([sample, sample.iloc[:1]]).to_csv(tmp_path / "sample.csv", index=False)
    with pytest.raises(UserError, match=r"sample.csv: the sample submission lists 1 image id\(s\) more than once"):
        check_submission(cfg.ensemble.output, tmp_path / "sample.csv")


def test_live_runs_dir_is_honoured(trained, tmp_path):
    import shutil
    root, overrides, cfg = trained
    moved = tmp_path / "elsewhere"
    shutil.copytree(cfg.run_dir, moved / cfg.experiment)
    for ckpt in (moved / cfg.experiment).glob("fold*/best.ckpt"):
        ckpt.write_bytes(b"")  # the moved copy is the one read: its damage must show
    live = load_config(None, overrides + [f"runs_dir={moved}"])
    with pytest.raises(UserError, match=str(moved / cfg.experiment / "fold0" / "best.ckpt")):
        run_infer(live)


# ---- inputs and settings -----------------------------------------------------------------------


def test_duplicates_list_naming_unknown_images_warns(tmp_path, caplog):
    folds, _ = make_tiny_set(tmp_path)
    train = folds[["image_name", "patient_id", "target"]]
    train.to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "dups.csv").write_text("image_name_1,image_name_2\nISIC_00000,ISIC_99999\n"
                                       "ISIC_00000,ISIC_00001\n")
    cfg = load_config(None, [f"data.train_csv={tmp_path}/train.csv", f"data.train_images={tmp_path}/jpeg",
                             f"data.duplicates_csv={tmp_path}/dups.csv"])
    with caplog.at_level("WARNING"):
        df = merge_tables(cfg.data)
    assert "dups.csv: 1 of the 2 image(s) it marks as duplicates are in no input set" in caplog.text
    assert "ISIC_99999" in caplog.text and "ISIC_00001" not in set(df["image_name"])


def test_every_unreadable_image_is_listed_up_front(tmp_path):
    folds, _ = make_tiny_set(tmp_path)
    folds[["image_name", "patient_id", "target"]].to_csv(tmp_path / "train.csv", index=False)
    jpeg = tmp_path / "jpeg"
    (jpeg / "ISIC_00000.jpg").write_bytes(b"")
    (jpeg / "ISIC_00001.jpg").write_bytes((jpeg / "ISIC_00001.jpg").read_bytes()[:100])
    (jpeg / "ISIC_00002.jpg").write_bytes(b"random bytes, not an image")
    (jpeg / "ISIC_00003.jpg").unlink()
    cfg = load_config(None, [f"data.train_csv={tmp_path}/train.csv", f"data.train_images={jpeg}"])
    with pytest.raises(UserError) as err:
        merge_tables(cfg.data)
    text = str(err.value)
    assert "4 of 48 listed image(s) missing or unreadable" in text
    for part in ("empty: 1 (ISIC_00000)", "truncated JPEG: 1 (ISIC_00001)",
                 "not a JPEG: 1 (ISIC_00002)", "missing: 1 (ISIC_00003)"):
        assert part in text


def test_an_error_from_a_loader_worker_is_reported_by_its_own_message():
    from pipeline.data import BadImageError
    wrapped = BadImageError("Caught BadImageError in DataLoader worker process 0.\n"
                            "Original Traceback (most recent call last):\n  File ...\n"
                            "pipeline.errors.BadImageError: /data/x.jpg: truncated JPEG\n")
    assert user_message(wrapped) == "/data/x.jpg: truncated JPEG"
    assert user_message(UserError("plain")) == "plain"


def test_list_entry_override_is_applied_or_refused_clearly():
    cfg = load_config(REPO / "configs/demo.yaml", ["data.external.0.images=/x",
                                                   "ensemble.output=${infer.submissions_dir}/e.csv"])
    assert cfg.data.external[0].images == "/x"
    assert cfg.ensemble.output == "submissions/demo/e.csv"
    with pytest.raises(ConfigError, match="'3' is not an index of a list of 1 entr"):
        load_config(REPO / "configs/demo.yaml", ["data.external.3.images=/x"])


def test_a_failed_start_does_not_block_the_corrected_run(tmp_path):
    folds, overrides = make_tiny_set(tmp_path)
    bad = load_config(None, overrides + ["model.backbone=no_such_net", "train.epochs=1"])
    with pytest.raises(UserError, match="no_such_net"):
        train_all(bad, [0])
    assert not (bad.run_dir / "config.yaml").exists()  # nothing was trained: nothing written
    bad.run_dir.mkdir(parents=True, exist_ok=True)
    from pipeline.config import save_config
    save_config(bad, bad.run_dir)  # a config left by an older version with nothing trained
    good = load_config(None, overrides + ["train.epochs=1"])
    train_all(good, [0])
    assert load_config(good.run_dir / "config.yaml").model.backbone == "test_efficientnet"


def test_resuming_with_a_checkpoint_interval_or_quiet_bars_is_no_other_training(tmp_path):
    from pipeline.config import changed_settings
    _, overrides = make_tiny_set(tmp_path)
    before = load_config(None, overrides)
    after = load_config(None, overrides + ["train.checkpoint_every_minutes=10",
                                           "train.progress_bar=true", "train.log_every_n_steps=5"])
    assert changed_settings(before, after) == []
    assert changed_settings(before, load_config(None, overrides + ["train.epochs=9"]))


def test_a_run_folder_copied_under_another_name_is_read_there(trained, tmp_path):
    import shutil
    root, overrides, cfg = trained
    shutil.copytree(cfg.run_dir, tmp_path / "copy")
    from pipeline.infer import trained_config
    live = load_config(None, overrides + [f"runs_dir={tmp_path}", "experiment=copy"])
    assert trained_config(live).run_dir == tmp_path / "copy"


def test_a_full_disk_in_the_ensemble_keeps_the_old_one(trained):
    root, overrides, cfg = trained
    ensemble = Path(cfg.ensemble.output)
    before = ensemble.read_bytes()
    result = run_limited(f"""
        from pipeline.config import load_config
        from pipeline.ensemble import run_ensemble
        from pipeline.cli import UserError
        try:
            run_ensemble(load_config(None, {overrides!r}))
        except UserError as err:
            print("ERROR", err)
        """, 64, root)
    assert f"ERROR {ensemble}: cannot write it (File too large); nothing was replaced" in result.stdout, result.stderr[-2000:]
    assert ensemble.read_bytes() == before and not list(ensemble.parent.glob(".ensemble.csv.*"))


def test_an_unreadable_image_in_a_loader_worker_is_reported_by_its_path(tmp_path):
    from pipeline.data import BadImageError, ImageDataset, make_loader
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(b"\xff\xd8 a JPEG cut short")
    loader = make_loader(ImageDataset([str(bad)] * 2), 2, 1, train=False)
    with pytest.raises(BadImageError) as err:
        next(iter(loader))
    assert str(err.value).startswith("Caught BadImageError")  # what torch re-raises
    assert user_message(err.value) == f"{bad}: truncated JPEG (no end-of-image marker): a partial copy?"


def test_inference_bars_follow_train_progress_bar(trained, capsys):
    root, overrides, cfg = trained
    run_infer(load_config(None, overrides + ["train.progress_bar=false"]))
    assert "test tta" not in capsys.readouterr().err
    run_infer(load_config(None, overrides + ["train.progress_bar=true"]))
    assert "test tta" in capsys.readouterr().err


def test_progress_bars_obey_the_setting(tmp_path, capsys):
    from pipeline.config import ModelConfig, TrainConfig
    from pipeline.data import ImageDataset, make_loader
    from pipeline.model import MelanomaModel
    from pipeline.predict import predict_logits
    folds, _ = make_tiny_set(tmp_path)
    model = MelanomaModel.from_configs(ModelConfig(backbone="test_efficientnet"), TrainConfig())
    loader = make_loader(ImageDataset(folds["image_path"][:8]), 4, 0, train=False)
    predict_logits([model], loader, ["identity"], desc="quiet", progress=False)
    assert "quiet" not in capsys.readouterr().err
    predict_logits([model], loader, ["identity"], desc="loud", progress=True)
    assert "loud" in capsys.readouterr().err


# ---- killed runs -------------------------------------------------------------------------------

KILL_FIT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from pytorch_lightning.callbacks import Callback
from pipeline.config import load_config
from pipeline.train import train_fold
from tests.conftest import make_tiny_set
folds, overrides = make_tiny_set(__import__("pathlib").Path({root!r}))
class Kill(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
train_fold(load_config(None, overrides + {extra!r}), 0, folds, callbacks=[Kill()])
"""


@pytest.mark.parametrize("extra,kill_at,saved", [
    (["train.epochs=3"], 6, 4),  # killed in epoch 2: resumes at the end of epoch 1
    (["train.epochs=3", "train.checkpoint_every_minutes=1e-6"], 7, 6),  # within the epoch
])
def test_a_killed_fold_resumes_and_ends_like_an_uninterrupted_one(tmp_path, extra, kill_at, saved):
    from pytorch_lightning.callbacks import Callback

    class Record(Callback):
        def __init__(self):
            self.start, self.lrs = None, []

        def on_train_start(self, trainer, pl_module):
            self.start = trainer.global_step

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    script = KILL_FIT.format(repo=str(REPO), root=str(tmp_path), kill_at=kill_at, extra=extra)
    killed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=240,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    folds, overrides = make_tiny_set(tmp_path)
    cfg = load_config(None, overrides + extra)
    out = fold_dir(cfg, 0)
    assert torch.load(out / "last.ckpt", weights_only=False)["global_step"] == saved
    assert not (out / "oof.csv").exists()
    resumed = Record()
    from pipeline.train import train_fold
    oof = train_fold(cfg, 0, folds, callbacks=[resumed])
    fresh_cfg = load_config(None, overrides + extra + [f"runs_dir={tmp_path}/fresh"])
    fresh = Record()
    train_fold(fresh_cfg, 0, folds, callbacks=[fresh])
    assert resumed.start == saved
    assert saved + len(resumed.lrs) == len(fresh.lrs)  # the same number of optimizer steps
    np.testing.assert_allclose(resumed.lrs, fresh.lrs[saved:], rtol=1e-6)  # the same OneCycle
    assert torch.load(out / "last.ckpt", weights_only=False)["global_step"] == len(fresh.lrs)
    valid = folds[folds.fold == 0]
    assert sorted(oof["image_name"]) == sorted(valid["image_name"])  # each image exactly once


def test_two_inferences_at_once_and_a_killed_one_lose_nothing(trained):
    root, overrides, cfg = trained
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    infer = ("import sys; sys.path.insert(0, {repo!r})\n"
             "from pipeline.config import load_config\nfrom pipeline.infer import run_infer\n"
             "import pipeline.infer as infer, os, signal\n"
             "{patch}"
             "run_infer(load_config(None, {overrides!r}))\n")
    folder = Path(cfg.infer.submissions_dir)
    before = len(read_manifest(folder))
    views = ["infer.views=[identity,hflip,vflip]"]
    runs = [subprocess.Popen([sys.executable, "-c", infer.format(repo=str(REPO), patch="",
                                                                overrides=overrides + views)],
                             cwd=root, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=240) == 0, run.stderr.read()[-2000:]
    manifest = read_manifest(folder)
    new = manifest.iloc[before:]
    assert len(new) == 2 * 3 * 3  # two runs x 3 folds x 3 views, every row whole
    assert new["n"].is_unique and all((folder / f).is_file() for f in new["file"])
    # killed after its second file: what it wrote stays numbered, the rerun builds a valid ensemble
    patch = ("real = infer.write_numbered\ncount = [0]\n"
             "def dying(*a, **k):\n    count[0] += 1\n"
             "    if count[0] == 3:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return real(*a, **k)\ninfer.write_numbered = dying\n")
    killed = subprocess.run([sys.executable, "-c", infer.format(repo=str(REPO), patch=patch,
                                                                overrides=overrides + views)],
                            cwd=root, env=env, timeout=240, capture_output=True, text=True)
    assert killed.returncode == -9
    assert len(read_manifest(folder)) == len(manifest) + 2
    assert not list(folder.glob(".submission.*"))
    output = run_infer(load_config(None, overrides + views))
    check_submission(output, root / "sample.csv")
    assert len(read_manifest(folder)) == len(manifest) + 2 + 9


def test_a_damaged_last_checkpoint_is_named_before_resuming(tmp_path):
    from pipeline.train import train_fold
    folds, overrides = make_tiny_set(tmp_path)
    cfg = load_config(None, overrides + ["train.epochs=1"])
    out = fold_dir(cfg, 0)
    out.mkdir(parents=True)
    (out / "last.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")
    with pytest.raises(UserError, match=r"fold0/last.ckpt: not a readable checkpoint"):
        train_fold(cfg, 0, folds)


def test_a_full_disk_during_training_is_one_error_naming_the_fold(tmp_path):
    result = run_limited(f"""
        from pathlib import Path
        from pipeline.config import load_config
        from pipeline.train import train_fold
        from pipeline.cli import UserError
        from tests.conftest import make_tiny_set
        import resource
        folds, overrides = make_tiny_set(Path({str(tmp_path)!r}))
        resource.setrlimit(resource.RLIMIT_FSIZE, (300000, 2**40))  # the disk fills after the images
        try:
            train_fold(load_config(None, overrides + ["train.epochs=1"]), 0, folds)
        except UserError as err:
            print("ERROR", err)
        """, 2**40, tmp_path)
    assert "runs/tiny/fold0" in result.stdout, result.stderr[-2000:]
    assert "cannot write it (File too large)" in result.stdout
    fold = tmp_path / "runs" / "tiny" / "fold0"
    assert not list(fold.glob(".*.tmp"))  # no temporary checkpoint left behind
    for ckpt in fold.glob("*.ckpt"):
        torch.load(ckpt, weights_only=False)  # whatever is there is whole


def test_a_folds_file_made_from_other_settings_is_refused(tmp_path):
    from pipeline.folds import run_folds
    from pipeline.train import read_folds
    folds, overrides = make_tiny_set(tmp_path)
    folds[["image_name", "patient_id", "target"]].to_csv(tmp_path / "train.csv", index=False)
    base = [f"data.train_csv={tmp_path}/train.csv", f"data.train_images={tmp_path}/jpeg",
            f"folds.output={tmp_path}/f.csv", "folds.n_folds=3"]
    run_folds(load_config(None, base))
    assert len(read_folds(load_config(None, base + ["train.epochs=3"]))) == len(folds)
    with pytest.raises(UserError, match=r"f.csv was made from other data or fold settings .*folds.seed: 42 -> 7"):
        read_folds(load_config(None, base + ["folds.seed=7"]))
