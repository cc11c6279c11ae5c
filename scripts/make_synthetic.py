"""`make data-demo`: generate the synthetic data set in Kaggle layout under `synthetic.out_dir`."""

import logging

from pipeline.cli import run
from pipeline.synthetic import generate_synthetic

log = logging.getLogger(__name__)


def main(cfg, args) -> None:
    summary = generate_synthetic(cfg.synthetic)
    log.info(
        "wrote %d train (%d patients) / %d test (%d patients) / %d external images to %s in %.1f s",
        summary.n_train, summary.n_train_patients, summary.n_test, summary.n_test_patients,
        summary.n_external, summary.out_dir, summary.seconds,
    )
    log.info("ceiling AUC (latent score) train=%.4f test=%.4f",
             summary.ceiling_auc_train, summary.ceiling_auc_test)


if __name__ == "__main__":
    run(main, __doc__)
