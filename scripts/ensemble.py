"""`make ensemble`: blend the submissions picked by `ensemble.*` filters from the manifest."""

from pipeline.cli import run
from pipeline.ensemble import run_ensemble


def main(cfg, args) -> None:
    run_ensemble(cfg)


if __name__ == "__main__":
    run(main, __doc__)
