"""`make compare`: each option of `compare.variants` over `compare.seeds`, side by side."""

from pipeline.cli import run
from pipeline.compare import run_compare


def main(cfg, args) -> None:
    run_compare(cfg, args.config, args.overrides)


if __name__ == "__main__":
    run(main, __doc__)
