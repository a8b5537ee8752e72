"""``actstore export`` and ``actstore import``: a run to Parquet, a Hugging Face ``datasets`` folder or netCDF,
and an Arrow cache made elsewhere (SAELens) or by ``export`` into a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from actstore.arguments import add_store_argument, ints, layer_selection, span
from actstore.exchange.cache_import import IMPORT_FORMATS, import_cache
from actstore.exchange.export import FORMATS, export_run
from actstore.store import Store


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a run's states and labels as Parquet, a Hugging Face datasets folder or netCDF",
        description="Write one site of a run, at the layers and rows asked for, to a format other tools read: "
        "parquet (one file: pandas, pyarrow, polars, DuckDB), hf-datasets (a datasets.save_to_disk folder) or "
        "netcdf (xarray). Rows are the run's samples or tokens, in its order, with their coordinates; the "
        "Arrow formats hold one column of states per layer, named SITE.LAYER. The run's recipe and provenance "
        "go along: Parquet schema metadata 'actstore', the dataset's info.description, netCDF attributes.",
    )
    add_store_argument(p)
    p.add_argument("--model", required=True, help="the run's model name (`actstore ls` lists the runs)")
    p.add_argument("--method", required=True, help="the run's method")
    p.add_argument("--format", dest="fmt", choices=FORMATS, required=True, help="the format written")
    p.add_argument(
        "--out", type=Path, required=True, help="the file (parquet, netcdf) or folder (hf-datasets) to write"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (a file, or a datasets folder)")
    p.add_argument("--site", help="the site exported (default: the run's first)")
    p.add_argument("--layers", type=layer_selection, help="comma list (3,7) or range START:STOP (default: all)")
    rows = p.add_mutually_exclusive_group()
    rows.add_argument(
        "--samples", type=ints, metavar="ID1,ID2", help="comma list of sample ids (capture runs: all their rows)"
    )
    rows.add_argument(
        "--rows", type=span, metavar="START:STOP", help="rows START:STOP of the run, as stored (default: all)"
    )
    p.set_defaults(func=run_export)

    p = subparsers.add_parser(
        "import",
        help="read an Arrow cache (SAELens, or actstore export's) into a run",
        description="Import a folder written by datasets' save_to_disk: a SAELens activation cache (one column "
        "named after a hook, Array2D(context_size, d_in), optional token_ids) becomes a capture run of token "
        "rows with one site and one layer, each cache row a text; a folder of `actstore export --format "
        "hf-datasets` becomes the run it was exported from. Rerun the same command to resume an interrupted "
        "import.",
    )
    p.add_argument("path", type=Path, help="the folder to import")
    p.add_argument("--format", dest="fmt", choices=IMPORT_FORMATS, required=True, help="the folder's format")
    add_store_argument(p)
    p.add_argument("--model", required=True, help="the model name of the run created")
    p.add_argument("--method", required=True, help="the method of the run created")
    p.add_argument("--column", help="a SAELens cache's column of activations (default: its one 2-D column)")
    p.add_argument(
        "--layer",
        type=int,
        help="the hook's layer, kept in the recipe (default: read from the column's name, blocks.N.hook_...)",
    )
    p.add_argument("--site", help="the site's name in the run (default: the column's name)")
    p.add_argument("--overwrite", action="store_true", help="replace the run if it holds something else")
    p.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    selection = export_run(
        Store(args.store),
        args.model,
        args.method,
        args.fmt,
        args.out,
        site=args.site,
        layers=args.layers,
        samples=args.samples,
        rows=None if args.rows is None else (args.rows.start, args.rows.stop),
        overwrite=args.overwrite,
    )
    print(
        f"wrote {args.out}: {len(selection.rows)} {selection.row_dim} rows x {len(selection.layers)} layers of "
        f"{selection.site} ({selection.width} wide, {selection.dtype})"
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    done = import_cache(
        Store(args.store),
        args.path,
        args.model,
        args.method,
        fmt=args.fmt,
        column=args.column,
        layer=args.layer,
        site=args.site,
        overwrite=args.overwrite,
    )
    print(f"{done.run}: +{done.added} {done.unit} from {args.path} ({done.texts} {done.unit}, {done.rows} rows stored)")
    return 0
