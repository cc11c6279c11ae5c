"""`make bench`: speed figures measured side by side in one run (see pipeline/bench.py)."""

from pipeline.bench import run_bench
from pipeline.cli import run


def main(cfg, args) -> None:
    run_bench(cfg)


if __name__ == "__main__":
    run(main, __doc__)
