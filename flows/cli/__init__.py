"""The ``dino`` console command: runs the project's Prefect flows in-process (no server to start).

    dino shard ../shared/data/imagenette-128/train s3://bucket/imagenette/train --shard-size 500
    dino pretrain s3://bucket/imagenette/train s3://bucket/checkpoints/run1 --preset small
    dino demo
    dino --help / dino shard --help / python -m flows.cli --help

One module per subcommand: ``shard.py``, ``pretrain.py``, ``extract.py``, ``evaluate.py``, ``reevaluate.py``,
``pipeline.py`` (``dino pipeline`` and ``dino demo``), ``register.py``; ``evaluation_options.py`` holds the options
that evaluate and reevaluate share; ``prefect_session.py`` how a command runs flows (quiet about the errors it
reports, Dask's INFO lines off the terminal, the command's own Prefect server, ``command_server.py``, that dies with
it); ``stops.py`` how a command stops on SIGTERM, SIGHUP or SIGINT; ``common.py`` the registry,
:class:`~flows.cli.common.UsageError`, the ``--task-runner`` option, the progress bar and the embedded-MLflow
setup. Each subcommand is one function registered with
:func:`~flows.cli.common.command`: ``configure(parser)`` adds its arguments and the decorated ``run(args) -> int``
executes it. Add a subcommand by writing those two functions in a new module and importing it below; :func:`main`
needs no change.

Every command checks its input before Prefect is imported (:mod:`tasks.validation`, the same checks the flows'
first tasks run): a user error exits with status 2 and one ``dino <cmd>: error: ...`` message within about a second,
without a traceback (``--debug`` prints it). Prefect and the flows are imported inside ``run`` so ``dino --help``
stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

# Importing a subcommand module registers its subcommands, in this order in `dino --help`.
from . import shard, pretrain, extract, evaluate, reevaluate, pipeline, register  # noqa: F401, I001
from .common import COMMANDS, add_debug_option, is_user_error
from .stops import CommandStopped, exit_status, stop_signals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dino", description="DINO pretraining pipeline (Prefect flows, in-process)")
    add_debug_option(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.configure(sub_parser)
        add_debug_option(sub_parser, default=argparse.SUPPRESS)  # `dino --debug CMD` and `dino CMD --debug` alike
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Local runs stay off the internet: no Prefect server analytics unless the user asks for them.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The in-process (ephemeral) Prefect server can take longer than Prefect's 20 s default to start on a busy
    # laptop or CI runner.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with stop_signals():  # SIGTERM, SIGHUP, SIGINT: an ordinary stop (flows/cli/stops.py)
            return COMMANDS[args.command].run(args)
    except CommandStopped as stopped:
        print(f"dino {args.command}: {stopped}; what was done is kept (shards, checkpoints, features, MLflow runs): "
              "run the same command again to resume", file=sys.stderr)
        return exit_status(stopped)
    except Exception as e:
        if not is_user_error(e):
            raise  # a bug or an outage: the traceback is the useful part
        if args.debug:
            traceback.print_exception(e)
        print(f"dino {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dino {args.command}: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130
