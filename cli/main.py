"""`universal-neurons`: the command-line interface, a thin layer over the Python API.

Every subcommand parses arguments, calls one public function, and prints where the results
are. Exit codes: 0 done; 2 an error a user can fix (`UniversalNeuronsError`: a bad input,
setting or an existing output) or one the system reported (a full disk, a permission),
printed as one line naming the problem and the fix; 3 an internal error (a bug: one line,
the traceback with `-v`); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Callable

from universal_neurons import __version__
from universal_neurons.errors import UniversalNeuronsError

__all__ = ["main", "build_parser"]

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register `run(args)` as a subcommand whose arguments `add(parser)` declares."""

    def wrap(add):
        def register(run):
            _COMMANDS[name] = (help, add, run)
            return run

        return register

    return wrap


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The argument parser. `command` names the one subcommand whose options are built
    (`"*"`: all of them; `None`: none, which is all `--help` needs and keeps it free of torch)."""
    from . import agreement, commands, explain, family, stages  # noqa: F401  (registers the subcommands)

    p = argparse.ArgumentParser(
        prog="universal-neurons",
        description="Find universal neurons: cache activations of several seeds, correlate, flag, ablate, report.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add, run) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if command in ("*", name):
            add(sp)
        sp.set_defaults(_run=run)
    return p


def _command_in(argv: list[str]) -> str | None:
    """The subcommand `argv` names (the first word that is one), or None."""
    from . import agreement, commands, explain, family, stages  # noqa: F401

    return next((a for a in argv if a in _COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        # a file-size limit makes writes fail with an error we report in one line instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "transformer_lens", "huggingface_hub", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.no_progress:
        from universal_neurons.runtime import set_progress

        set_progress(False)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UniversalNeuronsError as e:
        print(f"universal-neurons {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished results are kept and an interrupted cache resumes on the next run",
              file=sys.stderr)
        return 130
    except OSError as e:  # the system said no: disk full, permissions, a vanished file
        if args.verbose:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"universal-neurons {args.command}: error: {e.strerror or e}{where}; earlier results are kept "
              "(outputs are written to a temporary file and renamed only when complete)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not a user error: one line here, the traceback with -v
        if args.verbose:
            raise
        print(f"universal-neurons {args.command}: internal error: {type(e).__name__}: {e} "
              "(rerun with -v for the traceback, and please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover - `python -m universal_neurons.cli.main`
    # the subcommands register in the imported module `universal_neurons.cli.main`, not in `__main__`
    from universal_neurons.cli.main import main as _main

    sys.exit(_main())
