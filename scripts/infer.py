"""`make infer`: TTA inference of every fold model into numbered submissions, then the ensemble."""

from pipeline.cli import run
from pipeline.infer import run_infer


def main(cfg, args) -> None:
    run_infer(cfg)


if __name__ == "__main__":
    run(main, __doc__)
