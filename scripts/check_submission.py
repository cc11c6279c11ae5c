"""`make check-submission`: check the ensemble CSV (or --file) against sample_submission.csv."""

import logging

from pipeline.cli import run
from pipeline.submit import check_submission

log = logging.getLogger(__name__)


def add_args(parser) -> None:
    parser.add_argument("--file", help="submission CSV to check (default: ensemble.output)")


def main(cfg, args) -> None:
    path = args.file or cfg.ensemble.output
    frame = check_submission(path, cfg.data.sample_submission)
    log.info("OK: %d rows in %s (ids match %s, targets in [%.4f, %.4f])", len(frame), path,
             cfg.data.sample_submission, frame["target"].min(), frame["target"].max())


if __name__ == "__main__":
    run(main, __doc__, extra=add_args)
