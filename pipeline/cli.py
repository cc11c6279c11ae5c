"""The one entry-point shape every script shares: `--config FILE` plus `section.key=value` overrides."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from pipeline.config import Config, ConfigError, load_config
from pipeline.errors import UserError

__all__ = ["UserError", "run", "parse_args", "setup_logging", "quiet_third_party"]

log = logging.getLogger(__name__)


NOISE = [  # third-party warnings that say nothing actionable to a user of this pipeline
    r".*exists and is not empty.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*smaller than the logging interval.*",
    r".*does not have many workers which may be a bottleneck.*",
]


def quiet_third_party() -> None:
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's start-up tips and accelerator notes
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    quiet_third_party()


def parse_args(argv: list[str] | None, description: str, extra: Callable | None = None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=os.environ.get("CONFIG"), help="experiment YAML")
    if extra is not None:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def run(
    main: Callable[..., object],
    description: str,
    argv: list[str] | None = None,
    extra: Callable | None = None,
) -> None:
    """Parse args, configure logging, load the config and call `main(cfg, args)`.

    Known user errors (bad config, bad input files) end with one clear line and exit code 2,
    not a traceback.
    """
    setup_logging()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv, description, extra)
    try:
        cfg: Config = load_config(args.config, args.overrides)
        main(cfg, args)
    except (ConfigError, UserError) as err:
        log.error("%s", user_message(err))
        sys.exit(2)


def user_message(err: Exception) -> str:
    """The error's own message. An error raised in a DataLoader worker arrives wrapped
    ("Caught BadImageError in DataLoader worker process 0.", then the worker's traceback): its
    last line holds the message, after the exception's qualified name."""
    text = str(err)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last.removeprefix(name).removeprefix(f"{type(err).__qualname__}: ")

