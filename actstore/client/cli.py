"""``actstore query``: talk to an actstore server from the shell (runs, jobs, describe, get, labels, share)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from actstore.analysis.params import MIN_SAMPLES, OVERLAP_K, PAPER
from actstore.arguments import csv_list, ints, layer_selection, span
from actstore.client.connection import DEFAULT_RETRY_FOR_S, RETRY_ENV
from actstore.exchange.netcdf import save_netcdf, with_provenance
from actstore.protocol import DEFAULT_ADDRESS

PARAM_HELP = {  # the analysis parameters (actstore.analysis.params.DensityParams), as the help explains them
    "maxk": "neighbours of each sample in the graph every metric reads",
    "gride_range_max": "largest neighbour rank of the Gride ID estimates (scales 2, 4, 8, ... up to it)",
    "id_scale_index": "which Gride scale's estimate is the ID (0: 2 neighbours, 3: 16)",
    "density_k": "neighbours of the kNN density",
    "z": "significance of the density-peak clustering (ADP's Z)",
    "subject_fraction": "label overlap's neighbours, as a fraction of the subject's samples",
    "answer_fraction": "label overlap's neighbours, as a fraction of the answer's samples",
}
NEIGHBOUR_COUNTS = ("maxk", "gride_range_max", "id_scale_index", "density_k")  # fitted to small runs


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, 0 or more, got {text!r}")
    return value


def _retry_for(args: argparse.Namespace) -> float:
    """--retry-for, else $ACTSTORE_RETRY_FOR, else the client's default; a bad value is a one-line error."""
    if args.retry_for is not None:
        return args.retry_for
    text = os.environ.get(RETRY_ENV)
    if text is None:
        return DEFAULT_RETRY_FOR_S
    try:
        return _seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"${RETRY_ENV}: {exc}") from None


_NOT_LABELS = {"samples", "positions", "tokens", "layers", "hidden", "dtype", "allow_lossy", "site", "model", "method"}


def _label(text: str) -> tuple[str, list[str]]:
    name, _, values = text.partition("=")
    if not name or not values:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,VALUE...], got {text!r}")
    return name, csv_list(values)


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("ACTSTORE_ADDRESS", DEFAULT_ADDRESS),
        help="server HOST[:PORT] (port 50051 unless given), or several replicas of one store separated "
        "by commas, whose calls are spread round-robin (default: $ACTSTORE_ADDRESS or %(default)s)",
    )
    p.add_argument("--token-file", type=Path, help="file holding the bearer token (default: $ACTSTORE_TOKEN)")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", type=Path, help="connect with TLS, trusting this PEM certificate")
    p.add_argument(
        "--retry-for",
        type=_seconds,
        metavar="SECONDS",
        help=f"how long to retry while the server is unavailable, e.g. restarting "
        f"(default: ${RETRY_ENV} or {DEFAULT_RETRY_FOR_S:g})",
    )


def register_analyze(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="run the study's density analyses on a server, with progress",
        description="Start density analyses of MODEL's runs on the server (or follow one "
        "started earlier: --attach), watch them, print the per-layer table.",
    )
    _connection(p)
    p.add_argument("model", nargs="?", help="the model whose runs to analyse (omitted with --attach)")
    p.add_argument(
        "--attach",
        metavar="JOB_ID",
        help="follow a job started earlier instead (`actstore query jobs` lists yours) and print its tables",
    )
    p.add_argument("--methods", type=csv_list, default=[], help="comma list of methods (runs of MODEL) to analyse")
    p.add_argument("--layers", type=layer_selection, help="comma list or START:STOP (default: every layer but 0)")
    p.add_argument("--per-subject", type=int, help="analyse the first N samples of each subject (the study: 200)")
    p.add_argument("--preset", default="paper", help="parameter preset (default: paper, the study's)")
    settings = p.add_argument_group(
        "analysis settings",
        "Each overrides the preset; the defaults shown are the paper preset's. A neighbour "
        f"count left unset (*) is lowered to fit the job's smallest run when it holds {PAPER.maxk} samples or fewer "
        f"(maxk below its samples, the others within maxk); runs under {MIN_SAMPLES} samples are refused.",
    )
    for name, text in PARAM_HELP.items():
        default = getattr(PAPER, name)
        settings.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(default),
            metavar=type(default).__name__.upper(),
            help=f"{text} (default: {default}{'*' if name in NEIGHBOUR_COUNTS else ''})",
        )
    settings.add_argument(
        "--compare-k",
        type=int,
        metavar="INT",
        help=f"neighbours of the data overlap of compared runs (default: {OVERLAP_K}*)",
    )
    p.add_argument(
        "--compare",
        type=csv_list,
        action="append",
        default=[],
        metavar="A,B",
        help="also compare two methods (or MODEL/METHOD runs) layer by layer; repeatable",
    )
    clouds = p.add_argument_group("capture runs", "Which cloud of a capture run's rows is analysed.")
    clouds.add_argument("--site", help="the site analysed (default: the run's first)")
    clouds.add_argument(
        "--reduction",
        help="last (default: each text's last token), position:P (negative from a text's end), mean (each "
        "text's rows averaged) or sample:N[:SEED] (N tokens drawn, seeded)",
    )
    clouds.add_argument("--label", help="a label column: the clusters' ARI and overlap with it (as ari_subject)")
    p.add_argument("--out", type=Path, help="also write the tables to this .csv (comparisons to *-compare.csv)")
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    layers = list(range(args.layers.start, args.layers.stop)) if isinstance(args.layers, slice) else args.layers
    params = {name: getattr(args, name) for name in PARAM_HELP if getattr(args, name) is not None}
    if any(len(pair) != 2 for pair in args.compare):
        raise ValueError("--compare takes two runs: A,B")
    starting = [args.model, args.methods, layers, args.per_subject, args.compare, args.compare_k, *params.values()]
    starting += [args.site, args.reduction, args.label]
    if args.attach is not None and any(value not in (None, []) for value in starting):
        raise ValueError("--attach follows a job as it was started: give no MODEL or analysis options with it")
    if args.attach is None and args.model is None:
        raise ValueError("give the MODEL whose runs to analyse, or --attach JOB_ID to follow a job")
    with _client(args) as client:
        if args.attach is not None:
            job = client.job(args.attach)
        else:
            job = client.analyze(
                args.model,
                args.methods,
                layers=layers,
                preset=args.preset,
                per_subject=args.per_subject,
                compare=[tuple(pair) for pair in args.compare],
                compare_k=args.compare_k,
                site=args.site,
                reduction=args.reduction,
                label=args.label,
                **params,
            )
        job.follow(f"job {job.id}")
        table = job.result()
    settings = {name: value for name, value in table.attrs.items() if name != "job_id"}
    if settings:  # what the numbers below were computed with, neighbour counts fitted to small runs included
        print("settings: " + " ".join(f"{name}={value}" for name, value in settings.items()))
    for dim, suffix in (("run", ""), ("pair", "-compare")):
        if dim in table.dims:
            frame = table[[name for name in table.data_vars if dim in table[name].dims]].to_dataframe()
            print(frame.to_string(float_format=lambda v: f"{v:.3f}"))
            if args.out:
                frame.to_csv(args.out.with_name(args.out.stem + suffix + args.out.suffix))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("query", help="query an actstore server", description=__doc__.split(": ", 1)[1])
    _connection(p)
    sub = p.add_subparsers(dest="query", required=True)

    runs = sub.add_parser("runs", help="list the runs you may read")
    runs.add_argument("--model")
    runs.add_argument("--method")
    sub.add_parser("jobs", help="list your analysis jobs, newest first (follow one: actstore analyze --attach ID)")

    for name, text in (
        ("describe", "one run's shape, labels, accuracy and provenance (JSON)"),
        ("get", "hidden states to a file"),
        ("labels", "sample labels to a file or the screen"),
        ("share", "change who may read a run (owner group only)"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("model")
        q.add_argument("method")
        if name in ("get", "labels"):
            q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
            q.add_argument("--samples", type=csv_list, help="comma list of sample ids (capture runs: all their rows)")
            q.add_argument(
                "--positions",
                type=span,
                help="START:STOP along the run's sample axis (a capture run with one row per text: its rows; for a "
                "capture run's tokens use --tokens and --token-positions)",
            )
            q.add_argument("--subject", type=csv_list, help="comma list of subjects to keep")
            q.add_argument("--answer", type=csv_list, help="comma list of answer letters to keep")
            q.add_argument(
                "--label",
                type=_label,
                action="append",
                default=[],
                metavar="NAME=V1,V2",
                help="keep rows whose label NAME (any label column of a capture run, e.g. topic=news) is one of "
                "the values, compared as text; repeatable",
            )
            q.add_argument(
                "--token-positions",
                type=ints,
                metavar="P1,P2",
                help="capture runs: keep the rows at these token positions of each text, negative from its end "
                "(0: the first token, -1: the last)",
            )
            q.add_argument(
                "--tokens", type=span, metavar="START:STOP", help="capture runs: rows START:STOP of the run, as stored"
            )
        if name == "get":
            q.add_argument("--site", help="a capture run's site (default: its first; `query describe` lists them)")
            q.add_argument("--layers", type=layer_selection, help="comma list (3,7) or range START:STOP (default: all)")
            q.add_argument("--hidden", type=span, help="START:STOP of hidden dimensions")
            q.add_argument(
                "--dtype",
                choices=["float32", "float16"],
                help="default: as stored (float32, or float16 for a capture run stored so); float16 is refused "
                "where it would round, unless --allow-lossy",
            )
            q.add_argument("--allow-lossy", action="store_true", help="accept float16 even where it rounds")
            q.add_argument(
                "--out",
                type=Path,
                required=True,
                help="a .npy, .nc or .zarr path (.nc: one variable, named after the site, with its coordinates; "
                "NetCDF 3 has no float16, so float16 states are written as float32, exactly)",
            )
        if name == "labels":
            q.add_argument("--out", type=Path, help="a .csv path (default: print)")
        if name == "share":
            q.add_argument("visibility", choices=["private", "shared", "public"])
            q.add_argument("--with", dest="shared_with", type=csv_list, default=[], help="groups, for 'shared'")
    p.set_defaults(func=run)


def _client(args: argparse.Namespace):
    from actstore.client import Client

    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("ACTSTORE_TOKEN")
    return Client(args.address, token=token, tls=args.tls_ca or args.tls, retry_for=_retry_for(args))


def _selection(args: argparse.Namespace) -> dict:
    samples = [int(s) for s in args.samples] if args.samples else args.positions
    selection = {
        "samples": samples,
        "subject": args.subject,
        "answer": args.answer,
        "positions": args.token_positions,
        "tokens": args.tokens,
    }
    for name, values in args.label:
        if name in _NOT_LABELS:
            raise ValueError(f"--label {name}=...: {name!r} names an option of the client, not a label filter")
        if selection.get(name) is not None:
            raise ValueError(f"--label {name}=... is given twice: give all its values at once (NAME=V1,V2)")
        selection[name] = values
    return selection


def run(args: argparse.Namespace) -> int:
    out = getattr(args, "out", None)
    if out is not None and out.exists() and not args.overwrite:  # checked before any data is fetched
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    with _client(args) as client:
        if args.query == "runs":
            found = client.runs(model=args.model, method=args.method)
            print(f"{'run':44} {'layers':>6} {'samples':>8} {'hidden':>6} {'accuracy':>8}  access")
            for r in found:
                accuracy = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
                access = r["visibility"] + (f" (owner {r['owner_group']})" if r["owner_group"] else "")
                samples = r["n_texts"] if r["kind"] == "capture" else r["n_samples"]
                print(
                    f"{r['model'] + '/' + r['method']:44} {r['n_layers']:>6} {samples:>8} "
                    f"{r['hidden']:>6} {accuracy:>8}  {access}{_capture_line(r)}"
                )
        elif args.query == "jobs":
            _print_jobs(client.jobs())
        elif args.query == "describe":
            print(json.dumps(client.describe(args.model, args.method), indent=2))
        elif args.query == "share":
            info = client.set_visibility(args.model, args.method, args.visibility, args.shared_with)
            print(
                f"{args.model}/{args.method}: {info['visibility']}"
                + (f" with {', '.join(info['shared_with'])}" if info["shared_with"] else "")
            )
        elif args.query == "labels":
            frame = client.labels(args.model, args.method, **_selection(args)).to_dataframe()
            if args.out:
                frame.to_csv(args.out)
            else:
                print(frame.to_string())
        else:
            states = client.hidden_states(
                args.model,
                args.method,
                layers=args.layers,
                hidden=args.hidden,
                dtype=args.dtype,
                allow_lossy=args.allow_lossy,
                site=args.site,
                **_selection(args),
            )
            info = client.describe(args.model, args.method)
            _save(with_provenance(states, info["recipe"], info["attributes"]), args.out, args.overwrite)
            widened = " (written as float32: NetCDF 3 has no float16)" if _widened(states, args.out) else ""
            print(f"wrote {args.out}: {dict(states.sizes)} {states.dtype}{widened}")
    return 0


def _capture_line(r: dict) -> str:
    """What a capture run holds beyond a question run's columns: its rows, sites and stored dtype."""
    if r["kind"] != "capture":
        return ""
    sites = ", ".join(
        site["name"] + ("" if site["width"] == r["hidden"] else f" ({site['width']} wide)") for site in r["sites"]
    )
    rows = f"{r['n_samples']} token rows" if r["row_dim"] == "token" else "one row per text"
    return f"; capture: {rows}, sites {sites}, {r['store_dtype']}"


def _print_jobs(jobs: list) -> None:
    """One line a job (``AnalysisJob``): id, state, progress, start (local time) and runs."""
    print(f"{'job':16} {'state':9} {'tasks':>9}  {'started':19}  runs")
    for job in jobs:
        seen = job.seen
        started = f"{seen['started']:%Y-%m-%d %H:%M:%S}" if seen["started"] else "-"
        print(
            f"{job.id:16} {seen['state']:9} {seen['tasks_done']:>4}/{seen['tasks_total']:<4}  {started:19}  "
            f"{', '.join(seen['runs'])}"
        )


def _widened(states, out: Path) -> bool:
    return out.suffix == ".nc" and states.dtype == np.float16


def _save(states, out: Path, overwrite: bool) -> None:
    if out.suffix == ".npy":
        np.save(out, states.values)
    elif out.suffix == ".nc":
        save_netcdf(states, out)
    elif out.suffix == ".zarr":
        states.to_dataset().assign_attrs(states.attrs).to_zarr(out, mode="w" if overwrite else "w-", consolidated=False)
    else:
        raise ValueError(f"--out must end in .npy, .nc or .zarr, not {out.suffix or out.name!r}")
