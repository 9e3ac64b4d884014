"""The ``optax-zclip`` command (also ``python -m optax_zclip``): one parser,
a subcommand per tool."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from optax_zclip._replay import _command as _replay_command

PROG = "optax-zclip"


class _Parser(argparse.ArgumentParser):
  """Reports a usage error on one line, as the commands report bad input."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
  """The command line's parser, with a subparser per command."""
  p = _Parser(
      prog=PROG,
      description="Tools of optax-zclip, adaptive gradient clipping for "
                  "JAX and Optax. Run `optax-zclip COMMAND --help` for a "
                  "command's options.")
  commands = p.add_subparsers(title="commands", metavar="COMMAND",
                              dest="command", required=True)
  _replay_command.add_parser(commands)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``).

  Returns the exit status: bad input (a missing file or column, a value that
  is not a number, an empty series, a bad method spec) is reported on one
  line of stderr, ``optax-zclip COMMAND: error: ...``, with status 2.
  """
  args = parser().parse_args(argv)
  try:
    return args.run(args)
  except BrokenPipeError:
    # The reader went away (`... | head`): stop quietly, as other commands do.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1
  except (ValueError, OSError) as e:
    msg = str(e) if isinstance(e, ValueError) else (
        f"{e.filename}: {e.strerror}" if e.filename else str(e))
    print(f"{PROG} {args.command}: error: {' '.join(msg.split())}",
          file=sys.stderr)
    return 2
