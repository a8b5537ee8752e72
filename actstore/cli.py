"""The ``actstore`` command line: ``ingest``, ``finetune``, ``ls``, ``serve``, ``query``, ``analyze``, ``study``,
``plot``, ``export``, ``import``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from actstore import __version__
from actstore.analysis import NotAnalysed
from actstore.arguments import add_store_argument
from actstore.client import ActstoreError
from actstore.store import Store, StoreError

SERVER_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # a server's log is read after the fact
# Errors a user can fix from the message alone: shown as one line, not a traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (StoreError, ValueError, FileNotFoundError, ActstoreError, NotAnalysed)


# S3 clients log where they found credentials and the endpoint at INFO, once per client, and datasets the
# array libraries it found as it is imported: noise in every command's output (and before a one-line error),
# kept with --verbose.
_CHATTY = ("botocore", "aiobotocore", "datasets")


def _ls(args: argparse.Namespace) -> int:
    store = Store(args.store)
    if not store.exists():
        raise StoreError(f"no actstore store at {store.url}")
    runs, damaged = store.scan()
    for problem in damaged:
        print(f"actstore: {problem}", file=sys.stderr)
    if not runs:
        print(f"no runs in {store.url}")
        return 0
    header = f"{'run':44} {'layers':>6} {'samples':>8} {'tokens':>9} {'hidden':>6} {'accuracy':>8} {'size':>9}"
    print(f"{header}  sites; status")
    for run in runs:
        layers, rows, hidden = run.shape
        tokens = rows if run.row_dim == "token" else "-"
        accuracy = f"{run.accuracy:.3f}" if run.accuracy is not None else "-"
        status = "complete" if run.complete else "partial (resume with the same ingest command)"
        print(
            f"{run.key:44} {layers:>6} {run.n_texts:>8} {tokens:>9} {hidden:>6} {accuracy:>8} "
            f"{run.size_bytes() / 1e6:>7.1f}MB  {','.join(run.sites)}; {status}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actstore", description="Hidden states of language models, stored, served and analysed layer by layer."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from actstore.client.cli import register as register_query
    from actstore.client.cli import register_analyze
    from actstore.exchange.cli import register as register_exchange
    from actstore.finetune.cli import register as register_finetune
    from actstore.ingest.cli import register as register_ingest  # torch loads only when ingest is asked for
    from actstore.server.cli import register as register_serve
    from actstore.study.cli import register as register_study

    register_ingest(sub)
    register_finetune(sub)
    register_serve(sub)
    register_query(sub)
    register_analyze(sub)
    register_study(sub)
    register_exchange(sub)
    ls = sub.add_parser("ls", help="list the runs in a store")
    add_store_argument(ls)
    ls.set_defaults(func=_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. Output piped into a reader that stops early (``| head``) ends the
    command quietly, as it would a C tool killed by SIGPIPE, rather than with a traceback."""
    try:
        return _run(argv)
    except BrokenPipeError:
        _discard_stdout()
        return 128 + signal.SIGPIPE


def _discard_stdout() -> None:
    """Point stdout at /dev/null: the interpreter flushes it at exit, which would raise again into the
    closed pipe and print "Exception ignored"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=SERVER_LOG_FORMAT if args.command == "serve" else "%(message)s",
    )
    if not args.verbose:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("actstore: interrupted; committed batches are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except _USER_ERRORS as exc:
        if args.verbose or os.environ.get("ACTSTORE_DEBUG"):
            raise
        print(f"actstore: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
