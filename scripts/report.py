"""`make report`: CV AUC, TTA gain on OOF, the final CSV and, on generated data, the hidden test AUC."""

from pipeline.cli import run
from pipeline.report import report


def main(cfg, args) -> None:
    report(cfg)


if __name__ == "__main__":
    run(main, __doc__)
