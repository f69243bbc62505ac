"""The recipes' front door: a user error is one line and exit status 2, an internal error keeps its traceback.

Every recipe ends with::

    if __name__ == "__main__":
        run_main(main)

**User error** (`is_user_error`): a ``ValueError`` (``ConfigError``, ``ViewStoreError``, the data and
index errors, ...) or a ``FileNotFoundError`` raised by a ``raise`` statement in genssl's own code. The
project's rule (docs/ENGINE.md, *Exit status*) is ValueError for a user mistake, with a message that
names the problem and the fix, and ``assert`` for internal invariants; so such an error is printed as

    <recipe>: error: <message>

on stderr, and the process exits with status 2 (argparse's status for a usage error), without a
traceback: the traceback would point into genssl, where nothing is to be fixed. Everything else is an
internal error and propagates with its traceback (status 1), including a ValueError raised inside a
library (torch, numpy, json) or by a builtin on genssl's own data (``int("x")``, a failed reshape): no
message was written for a user there. ``GENSSL_TRACEBACK=1`` prints the traceback of a user error too.

**Several ranks.** Every rank usually meets the same user error (each parses the same config and reads
the same data), and one line is wanted, not one per rank. Rank 0 (``$RANK``, set by every launcher;
absent = a world of one) prints and exits at once. Any other rank waits `PEER_GRACE_S` first and then
prints with its rank: when rank 0 failed too, the launcher (deepspeed, torchrun) has stopped every
process by then, so that line never appears; when the error was this rank's alone (a folder missing on
one node), it is not lost. The wait also keeps a quick rank from making the launcher kill rank 0 before
rank 0 has printed. The launcher then exits with the failed rank's status (deepspeed: 2; torchrun: 1).
"""

from __future__ import annotations

import dis
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

EXIT_USER_ERROR = 2
# Seconds a rank other than 0 waits before printing its user error: more than the deepspeed launcher's
# 1 s poll of its children (torchrun polls every 0.1 s), so a launcher that saw rank 0 fail has ended
# this process by then.
PEER_GRACE_S = 5.0
_RAISE = dis.opmap["RAISE_VARARGS"]


def _is_genssl_module(name: str) -> bool:
    # a recipe run as a script is "__main__"; run_main is only called from a recipe's __main__ block
    return name in ("__main__", "genssl") or name.startswith("genssl.")


def is_user_error(exc: BaseException) -> bool:
    """True when ``exc`` is a ValueError or FileNotFoundError raised by a ``raise`` statement in
    genssl's code (see the module docstring)."""
    if not isinstance(exc, (ValueError, FileNotFoundError)) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:  # the innermost frame: where the exception was raised
        tb = tb.tb_next
    frame = tb.tb_frame
    return (_is_genssl_module(frame.f_globals.get("__name__", ""))
            and frame.f_code.co_code[tb.tb_lasti] == _RAISE)


def run_main(main: Callable[[], Any], name: str | None = None) -> Any:
    """Call ``main()``; a user error ends the process with status 2 and one line on stderr (rank 0's).
    ``name`` (default: the file ``main`` is defined in) prefixes the line."""
    try:
        return main()
    except Exception as exc:
        if not is_user_error(exc):
            raise
        name = name or Path(main.__code__.co_filename).stem
        rank = int(os.environ.get("RANK", "0") or 0)
        if os.environ.get("GENSSL_TRACEBACK", "") not in ("", "0"):
            traceback.print_exc()
        if rank != 0:
            time.sleep(PEER_GRACE_S)
        where = "" if rank == 0 else f" (rank {rank})"
        print(f"{name}: error{where}: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
