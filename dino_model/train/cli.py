"""The command line of ``python -m dino_model.train`` (and ``torchrun ... -m dino_model.train``): parse, load the
config, train, and turn the outcome into the exit code the package docstring lists."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from dino_model import distributed as dist_utils
from dino_model.checkpoint import config_source
from dino_model.config import ConfigError, load_config
from dino_model.fast_path import FastPathError
from dino_model.metrics import emit_progress
from dino_model.parent_death import exit_with_parent_from_env

from .loop import train
from .outcomes import (
    EXIT_COLLAPSED,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_FAST_PATH,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_TERMINATED,
    NonFiniteLoss,
    TrainingCollapsed,
    TrainingTerminated,
)

__all__ = ["parse_args", "main"]

log = logging.getLogger("dino_model.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dino_model.train",
        description="DINO self-supervised pretraining (run under torchrun for several processes).",
    )
    p.add_argument("--config", help="YAML or JSON config file (sections model/crops/data/loss/optim/train/...)")
    p.add_argument("--preset", help="preset(s) applied before the file: reference, boost, multicrop10, small, "
                                    "small-data (or one of its size buckets small-data-20k/-50k/-100k/-200k), "
                                    "resnet50 (comma-separated to chain)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. optim.lr=1e-3")
    return p.parse_args(argv)


def _dataset_size(args: argparse.Namespace) -> int:
    """The training data's image count, for ``--preset small-data``: the config resolved without that preset
    names the data."""
    from dino_model.data.counting import count_images

    presets = ",".join(p for p in (args.preset or "").split(",") if p.strip() != "small-data") or None
    source = load_config(config_source(args.config), args.overrides, preset=presets).data.source
    if not source:
        raise ConfigError("--preset small-data needs data.source (its size picks the recipe)")
    return count_images(source)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code (see the package docstring)."""
    args = parse_args(argv)
    # First, before anything slow: from here on a dying parent (torchrun, the flow's launcher) stops this process.
    exit_with_parent_from_env()
    _setup_logging()
    try:
        cfg = load_config(config_source(args.config), args.overrides, preset=args.preset,
                          dataset_size=lambda: _dataset_size(args))
        if args.print_config:
            import json

            print(json.dumps(cfg.to_dict(), indent=2))
            return EXIT_OK
        result = train(cfg)
        if dist_utils.is_main_process():
            log.info("training %s at step %d; export: %s", result.status, result.step,
                     result.export["weights"] if result.export else "none")
        return EXIT_OK
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        return EXIT_CONFIG
    except NonFiniteLoss as e:
        log.error("%s", e)
        return EXIT_NONFINITE
    except FastPathError as e:
        log.error("%s", e)
        if dist_utils.is_main_process():
            emit_progress("error", kind="fast_path", part=e.verdict.part, message=str(e),
                          fast_path={e.verdict.part: e.verdict.as_record()})
        return EXIT_FAST_PATH
    except TrainingCollapsed as e:
        log.error("%s", e)
        return EXIT_COLLAPSED
    except (TrainingTerminated, KeyboardInterrupt) as e:
        log.warning("%s", e)
        return EXIT_TERMINATED
    except Exception:  # noqa: BLE001 - report with the traceback and a non-zero code
        log.exception("training failed")
        if dist_utils.is_main_process():
            with contextlib.suppress(Exception):
                emit_progress("error", kind="exception", message=str(sys.exc_info()[1]))
        return EXIT_FAILURE
    finally:
        dist_utils.cleanup()
