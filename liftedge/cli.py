"""The `liftedge` command line: argument parsing and error reporting only.

Each sub-command lives in `liftedge.commands.<name>` and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`. Work is done by
the library modules those functions call. A `LiftedgeError` becomes one line on stderr and
exit status 2; `--debug` shows the traceback instead. Third-party noise is off unless
`--verbose` (`liftedge.quiet`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from liftedge import __version__, quiet
from liftedge.errors import LiftedgeError

# Order is the order of `liftedge --help`.
COMMANDS = ("build", "plan", "quantize", "eval", "inspect", "lattice", "devices", "profile")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liftedge",
        description="Compile causal LMs with LiftQuant to the memory budget of a phone.",
    )
    parser.add_argument("--version", action="version", version=f"liftedge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--verbose", action="store_true",
                        help="show what the libraries liftedge drives print (warnings, logs, native lines)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"liftedge.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"liftedge.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet.quiet_python(verbose=args.verbose or args.debug)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    _terminate_as_exception()
    try:
        return int(args.func(args) or 0)
    except LiftedgeError as exc:
        if args.debug:
            raise
        print(f"liftedge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("liftedge: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except Terminated:
        print("liftedge: terminated; no partial output was left behind", file=sys.stderr)
        return 143


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that every cleanup (temporary folders, locks) runs."""


def _terminate_as_exception() -> None:
    def handler(signum, frame):
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def entry() -> None:
    """The `liftedge` console script: `main` with native stderr noise filtered (unless --verbose)."""
    argv = sys.argv[1:]
    if "--verbose" not in argv and "--debug" not in argv:
        quiet.filter_native_stderr()
    sys.exit(main(argv))


if __name__ == "__main__":
    entry()
