"""Command line: ``sheap-dask demo | fit | catalog | info | ingest``.

The only module that prints; everything else logs. Defaults come from ``dask.config``
(``sheap_dask.cli.*`` and the fit options), so the Helm chart's environment applies here too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence

from . import config
from ._version import __version__

logger = logging.getLogger("sheap_dask.cli")

#: printed (alone) when Ctrl-C stops a command; the exit status is then 130
INTERRUPTED = "interrupted: completed chunks are saved; run the same command again to resume"
#: exit status of `sheap-dask fit` when every spectrum is no_data (unless --allow-no-data)
EXIT_ALL_NO_DATA = 3

# Python keywords in messages -> the flags of this command line
FLAGS = {
    "resume=False": "--no-resume",
    "resume=True": "--resume",
    "overwrite=True": "--overwrite",
    "force=True": "--force",
    "skip_bad=True": "--skip-bad",
    "fit_dataset": "sheap-dask fit",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sheap-dask`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # distributed logs every worker start/stop at INFO: only with -v. Importing it first,
    # because its import sets its own logger levels from dask.config.
    import distributed  # noqa: F401

    logging.getLogger("distributed").setLevel(max(level, logging.INFO) if args.verbose else logging.WARNING)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    config.configure_threads()  # before JAX starts in this process
    from .stores import cli_spelling

    previous_show = warnings.showwarning
    if not args.verbose:
        warnings.showwarning = _show_warning
    previous_handlers = _interrupt_quietly()
    try:
        with cli_spelling(FLAGS):
            return args.func(args)
    except KeyboardInterrupt:
        _quiet_shutdown()
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as exc:  # a clean one-line error for users, the traceback with -v
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous_show
        import signal

        for signum, previous in previous_handlers.items():
            signal.signal(signum, previous)


def _interrupt_quietly() -> dict:
    """Ctrl-C (SIGINT) and SIGTERM (``kill``, a Kubernetes pod deleted, ``helm upgrade``) stop
    a command alike: the store's lock is released and the cluster closed on the way out.

    The cluster's loggers are quieted in the handler itself, before the interrupt reaches
    distributed: its ``sync`` schedules a cancel on the event loop thread as the interrupt
    passes, and when the interrupt lands before the call has started its future (distributed
    2026.8) that cancel logs a ``NameError`` traceback, which is not news either. Returns the
    previous handlers (none outside the main thread, where no handler can be set).
    """
    import signal
    import threading

    def handler(signum, frame):
        _quiet_shutdown()
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return {}
    # SIGINT only where Python's own handler is in place (a job started with it ignored stays so)
    signals = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else [])
    return {signum: signal.signal(signum, handler) for signum in signals}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning: ...`` paragraph, without the file and line of the code."""
    print(f"warning: {message}", file=file or sys.stderr)


def _quiet_shutdown() -> None:
    """After Ctrl-C: the cluster's closing chatter (tasks cancelled, workers killed) is not news.
    Their child loggers too: distributed's logging config gives ``tornado.application`` its own
    level, which a parent's does not override."""
    roots = ("distributed", "tornado", "asyncio")
    for name in [*roots, *list(logging.root.manager.loggerDict)]:
        if name.split(".")[0] in roots:
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sheap-dask", description="Fit models to very many spectra with JAX on Dask.")
    p.add_argument("--version", action="version", version=f"sheap-dask {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command")

    d = sub.add_parser("demo", help="fit bundled synthetic quasar spectra on a local cluster and print a summary")
    d.add_argument("--n", type=int, default=None, help=f"number of spectra (default {config.get('cli.demo_n')})")
    d.add_argument("--chunk", type=int, default=None, help=f"spectra per chunk (default {config.get('cli.demo_chunk')})")
    d.add_argument("--store", default=None, help=f"output fit store (default {config.get('cli.demo_store')})")
    d.add_argument("--seed", type=int, default=0, help="random seed of the synthetic spectra")
    d.add_argument("--force", action="store_true", help="break a stale lock on the store (its writer was killed)")
    _add_fit_options(d)
    d.set_defaults(func=_cmd_demo)

    f = sub.add_parser("fit", help="fit every spectrum of a zarr store; re-running resumes")
    f.add_argument("input", help="input zarr store (path or fsspec URL) with flux, ivar and wavelength")
    f.add_argument("output", help="output zarr store of fits (resumed when it exists)")
    f.add_argument("--model", default="hbeta", type=_region_arg, help="built-in region: hbeta, halpha, mgii, civ (default hbeta)")
    f.add_argument("--no-coverage", action="store_true",
                   help="fit every spectrum (default: only those whose rest-frame coverage supports the region; see sd.models.covering_spectra)")
    _add_region_options(f)
    f.add_argument("--chunk", type=_positive_int("--chunk"), default=None, help="spectra per chunk (default: the input's chunks)")
    f.add_argument("--no-resume", action="store_true", help="overwrite OUTPUT (a fit store) instead of resuming it")
    f.add_argument("--force", action="store_true", help="break a stale lock on OUTPUT (its writer was killed)")
    f.add_argument("--allow-no-data", action="store_true", help="exit 0 even when every spectrum is no_data (default: exit 3)")
    _add_fit_options(f)
    f.set_defaults(func=_cmd_fit)

    c = sub.add_parser("catalog", help="a quasar catalogue: every region each spectrum covers, fitted and measured, one row per spectrum")
    c.add_argument("paths", nargs="+", metavar="IN ... OUT",
                   help="a zarr store of spectra (flux, ivar, wavelength, redshift) or SDSS spec files (ingested first into "
                        "OUT's spectra store), then the catalogue: a catalogue store (--format zarr, resumed when it exists) or a "
                        "FITS/parquet/CSV file")
    c.add_argument("--spectra", default=None, help="where SDSS files given as IN are ingested (default OUT_STORE.spectra.zarr)")
    c.add_argument("--regions", default="auto", type=_regions_arg, help="auto (every built-in region) or a comma-separated list, e.g. hbeta,mgii")
    c.add_argument("--format", default="zarr", choices=["zarr", "fits", "parquet", "csv"], help="output format (default zarr: the catalogue store)")
    c.add_argument("--store", default=None,
                   help="catalogue store (the regions' fit stores, for resume) with --format fits/parquet/csv (default OUTPUT.store)")
    c.add_argument("--n-mc", type=_nonnegative_int("--n-mc"), default=None,
                   help="resampling Monte Carlo realizations per fit for the errors (DR16Q: 25; default from config: 0, covariance draws)")
    c.add_argument("--n-samples", type=_positive_int("--n-samples"), default=None, help="Monte Carlo draws per measurement (default 200)")
    c.add_argument("--fiducial", default="dr16q", type=_fiducial_arg,
                   help="fiducial black-hole mass: dr16q (H-beta z<0.8, MgII to 1.9, CIV above), a region or a recipe name")
    c.add_argument("--chunk", type=_positive_int("--chunk"), default=None, help="spectra per chunk of each region's fit")
    c.add_argument("--no-resume", action="store_true", help="replace the catalogue store instead of resuming it")
    c.add_argument("--overwrite", action="store_true", help="replace an existing FITS/parquet/CSV OUTPUT file")
    c.add_argument("--force", action="store_true", help="break a stale lock on the catalogue store (its writer was killed)")
    _add_region_options(c)
    _add_fit_options(c)
    c.set_defaults(func=_cmd_catalog)

    i = sub.add_parser("info", help="summarise a fit store: chunks done, status counts, model, options")
    i.add_argument("store")
    i.set_defaults(func=_cmd_info)

    g = sub.add_parser("ingest", help="SDSS spec or DESI coadd FITS files -> one zarr store on a common grid")
    g.add_argument("files", nargs="+", help="SDSS spec/spec-lite or DESI coadd/spectra FITS files (and finally the output store)")
    g.add_argument("--chunk", type=int, default=256, help="spectra per chunk of the store")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output store (one written by ingest)")
    g.add_argument("--force", action="store_true", help="break a stale lock on the output store (its writer was killed)")
    g.add_argument("--mask-bits", default="default", help="and_mask bits that mask a pixel: default, all, none or comma-separated names")
    g.add_argument("--ebv", default=None, type=_ebv_arg, help="Galactic E(B-V) to de-redden with: a number, sfd or sf11 (from the files)")
    g.add_argument("--dereddening", default="ccm89", choices=["ccm89", "odonnell94", "f99"], help="extinction law (default ccm89)")
    g.add_argument("--wavelength-range", nargs=2, type=float, default=None, metavar=("MIN", "MAX"), help="keep only this observed range (Angstrom)")
    g.add_argument("--jobs", type=int, default=None, help="parallel file readers (default: CPU count)")
    g.add_argument("--skip-bad", action="store_true", help="leave out unreadable files (listed in the store's attrs) instead of stopping")
    g.add_argument("--resume", action="store_true", help="finish an interrupted ingestion into OUTPUT")
    g.add_argument("--redshifts", default=None, help="DESI: redrock/zcatalog file with TARGETID, Z, ZWARN, SPECTYPE")
    g.add_argument("--qso-only", action="store_true", help="DESI: keep only SPECTYPE QSO with ZWARN 0 (needs --redshifts)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=_cmd_ingest)
    return p


def _add_region_options(p: argparse.ArgumentParser) -> None:
    """The keywords of sd.models.region (the catalogue applies each to the regions it concerns)."""
    p.add_argument("--n-broad", type=_n_broad_arg, default=None, help="Gaussians of each broad line, 1-4 (default 2)")
    p.add_argument("--no-feii", action="store_true", help="leave FeII out of the hbeta and mgii models")
    p.add_argument("--oiii-wing", action="store_true", help="hbeta: a blueshifted outflow wing on each [OIII] line")
    p.add_argument("--balmer", action="store_true", help="mgii: add a Balmer continuum")
    p.add_argument("--host", default=None, choices=["auto", "on", "off"], help="host-galaxy starlight (default auto: on for hbeta and halpha)")
    p.add_argument("--host-template", default=None, metavar="NAME|FILE",
                   help="host templates: a built-in set (sdss+ssp, the default: three SDSS galaxies and two old populations; "
                        "sdss, the galaxies alone, cheaper; mastar) or a CSV/text file of your own")
    p.add_argument("--continuum", default=None, choices=["windows", "refined", "joint"],
                   help="windows: the continuum on line-free windows first, then the lines (the default without a host); "
                        "refined: then the continuum and the detected lines stepped over the whole window (the default with a host); "
                        "joint: one fit of everything")


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, type=_scheduler_arg, help="address of a running Dask scheduler (tcp://host:8786); default: a local cluster")
    where.add_argument("--workers", default=None, type=_positive_int("--workers"),
                       help="workers of the local cluster started here (default: one per CPU core)")
    p.add_argument("--method", default=None, choices=["lm", "adam", "lbfgs"], help="batched optimizer (default from config: lm)")
    p.add_argument("--num-steps", type=int, default=None, help="iteration budget of the batched solve")
    p.add_argument("--fallback", default=None, choices=["slsqp", "none"], help="re-fit failed spectra with SLSQP (default) or not")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_int(flag: str, minimum: int = 1):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer >= {minimum} (e.g. {flag} {max(minimum, 1) * 4})")
        return number

    return parse


def _nonnegative_int(flag: str):
    return _positive_int(flag, 0)


def _n_broad_arg(value: str) -> int:
    if value not in ("1", "2", "3", "4"):
        raise argparse.ArgumentTypeError(f"{value!r}: the broad line has 1 to 4 Gaussians (e.g. --n-broad 2)")
    return int(value)


def _region_arg(value: str) -> str:
    from .models.regions import REGIONS

    if value not in REGIONS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a built-in region; use one of {', '.join(REGIONS)}")
    return value


def _regions_arg(value: str) -> str:
    from .models.regions import REGIONS

    if value.strip() == "auto":
        return "auto"
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in REGIONS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"{value!r}: {'no region named' if not names else 'unknown region ' + ', '.join(map(repr, bad))}; use auto or a "
            f"comma-separated list of {', '.join(REGIONS)} (e.g. --regions hbeta,mgii)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{value!r} names a region twice (e.g. --regions hbeta,mgii)")
    return ",".join(names)


def _fiducial_arg(value: str) -> str:
    from .catalog_table import fiducial_rule
    from .errors import OptionError

    try:
        fiducial_rule(value)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace(f"fiducial={value!r}: use", f"{value!r}: use")) from None
    return value


def _ebv_arg(value: str):
    if value in ("sfd", "sf11"):
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number, sfd or sf11 (Galactic E(B-V) in magnitudes)") from None


def _scheduler_arg(value: str) -> str:
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(value)
        if scheme in ("tcp", "tls", "ws", "wss"):
            host, port = parse_host_port(location, 8786)
            if not host or not 0 < int(port) < 65536:
                raise ValueError(f"port {port} is out of range")
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a scheduler address ({exc}); expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:8786"
        ) from None
    return value


def _client(args):
    """(client, cluster): of the scheduler at ``--scheduler``, else of a local cluster started here."""
    if args.scheduler is None:
        import dask

        from .cluster import LOCAL_SCHEDULERS, start_default_cluster

        if dask.config.get("scheduler", None) in LOCAL_SCHEDULERS:  # e.g. synchronous, set in Python
            return None, None

        workers = getattr(args, "workers", None)
        with dask.config.set({"sheap_dask.cluster.n_workers": workers} if workers else {}):
            # Worker warnings (cancelled tasks at Ctrl-C, ...) only with -v.
            return start_default_cluster(silence_logs=logging.WARNING if args.verbose else logging.ERROR)
    from distributed import Client

    address = args.scheduler
    try:
        return Client(address), None
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"--scheduler {address}: cannot connect to a Dask scheduler there ({exc})") from None


@contextlib.contextmanager
def _cluster(args):
    """The client of ``--scheduler`` or of a local cluster, closed on the way out (quietly
    after Ctrl-C)."""
    client, cluster = _client(args)
    try:
        yield client
    except KeyboardInterrupt:
        _quiet_shutdown()
        raise
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def _fit_kwargs(args) -> dict:
    return dict(method=args.method, num_steps=args.num_steps, fallback=args.fallback, progress=not args.no_progress)


def _region_options(args, name: str, *, strict: bool) -> dict:
    """The keywords of ``sd.models.region(name)`` the flags ask for. ``strict``: a flag that does
    not apply to ``name`` is an error (``fit``); else it is left out (``catalog``: each flag goes
    to the regions it concerns)."""
    kwargs = {}
    if getattr(args, "n_broad", None) is not None:
        kwargs["n_broad"] = args.n_broad
    if getattr(args, "no_feii", False) and (strict or name in ("hbeta", "mgii")):
        kwargs["feii"] = False
    for flag, key, regions in (("oiii_wing", "oiii_wing", ("hbeta",)), ("balmer", "balmer", ("mgii",))):
        if getattr(args, flag, False):
            if name in regions:
                kwargs[key] = True
            elif strict:
                raise ValueError(f"--{flag.replace('_', '-')} applies to the {' and '.join(regions)} region only, not --model {name}; "
                                 "drop the flag or fit that region")
    host = getattr(args, "host", None)
    if host is not None:
        kwargs["host"] = {"auto": "auto", "on": True, "off": False}[host]
    template = getattr(args, "host_template", None)
    if template is not None:
        if strict and host == "off":
            raise ValueError("--host-template names the templates of a host, but --host off leaves the host out; drop one of the two")
        kwargs["host_template"] = template  # a region without a host ignores it
    if getattr(args, "continuum", None) is not None:
        kwargs["continuum"] = args.continuum
    return kwargs


def _region_model(args):
    from .models import region

    return region(args.model, **_region_options(args, args.model, strict=True))


def _cmd_demo(args) -> int:
    import numpy as np

    from .errors import StoreExistsError
    from .fit import fit_dataset
    from .models import region
    from .stores import cli_spelling, describe_path, preflight
    from .synthetic import synthetic_spectra

    n = args.n or config.get("cli.demo_n")
    chunk = args.chunk or config.get("cli.demo_chunk")
    store = args.store or config.get("cli.demo_store")
    # The demo replaces only a store it wrote itself (marked sheap_demo); other data is refused.
    info = describe_path(store)
    if info.kind == "fit" and not info.attrs.get("sheap_demo"):
        raise StoreExistsError(
            f"--store {store!r} is a fit store not written by sheap-dask demo; the demo replaces only its own stores. "
            "Pass another --store."
        )
    preflight(store, "fit", force=args.force)
    print(f"sheap-dask {__version__} demo: {n} synthetic H-beta-region quasar spectra, chunks of {chunk}")
    ds = synthetic_spectra(n, seed=args.seed).chunk({"spectrum": chunk})
    model = region("hbeta")
    with _cluster(args) as client:
        t0 = time.perf_counter()
        with cli_spelling({**FLAGS, "fit_dataset": "sheap-dask demo"}, store_attrs={"sheap_demo": 1}):
            fits = fit_dataset(ds, model, store=store, resume=False, force=args.force, client=client, **_fit_kwargs(args))
        elapsed = time.perf_counter() - t0
        fits = fits.load()
    print(f"fitted {n} spectra in {elapsed:.1f} s ({n / elapsed:.1f} spectra/s, cluster start-up and compilation included)")
    _print_status(fits)
    ok = fits.status.isin([0, 1]).values
    print(f"median reduced chi-square (fitted spectra): {float(np.nanmedian(fits.redchi2.values[ok])):.3f}")
    # the parameters the generator knows (a model may have more, e.g. tied lines set free)
    known = [str(p) for p in fits.param.values if p in set(ds["true_params"].param.values)]
    truth = ds["true_params"].sel(param=known).values
    fitted = fits.params.sel(param=known).values
    print("parameter recovery (fitted spectra): median |fit - true| / |true|, fraction within 10%")
    for j, name in enumerate(known):
        if name not in model.params.free_names:
            continue
        with np.errstate(all="ignore"):
            rel = np.abs(fitted[ok, j] - truth[ok, j]) / np.abs(truth[ok, j])
        rel = rel[np.isfinite(rel)]
        if rel.size:
            print(f"  {name:24s} {np.median(rel):8.3f}   {np.mean(rel < 0.1):6.1%}")
    print(f"fit store written: {store}  (inspect with: sheap-dask info {store})")
    return 0


def _cmd_fit(args) -> int:
    import numpy as np

    from .fit import fit_dataset
    from .status import Status

    from .stores import preflight

    model = _region_model(args)
    preflight(args.output, "fit", [args.input], force=args.force)  # before a cluster starts
    data = args.input
    if not args.no_coverage:
        data = _covered(args.input, model, args.model)
    with _cluster(args) as client:
        t0 = time.perf_counter()
        fits = fit_dataset(
            data, model, store=args.output, resume=not args.no_resume, force=args.force, client=client,
            chunk_size=args.chunk, **_fit_kwargs(args),
        )
        elapsed = time.perf_counter() - t0
        fits = fits.load()
    n = fits.sizes.get("spectrum", 0)
    print(f"{args.output}: {n} spectra, {fits.attrs.get('sheap_chunks_fitted', '?')} chunks fitted in this run ({elapsed:.1f} s)")
    refitted = fits.attrs.get("sheap_chunks_refitted", 0)
    if refitted:
        print(f"  of which {refitted} were marked done but failed their check (see the warning above)")
    _print_status(fits)
    status = np.asarray(fits.status.values)
    if status.size and np.all(status == Status.NO_DATA):
        if args.allow_no_data:
            print("every spectrum is no_data (see the warning above); exit status 0 as asked by --allow-no-data")
            return 0
        print("error: every spectrum is no_data (see the warning above for the likely cause); pass --allow-no-data to exit 0 anyway",
              file=sys.stderr)
        return EXIT_ALL_NO_DATA
    return 0


def _covered(path: str, model, name: str):
    """The spectra of ``path`` whose rest-frame coverage supports ``model``; the path itself when
    that is all of them, or none (then every spectrum is recorded as no_data, with its cause)."""
    from .catalog import _covering
    from .inputs import open_store

    ds = open_store(path, None)
    keep = _covering(ds, model, dim="spectrum", flux="flux", ivar="ivar", redshift="redshift")
    n = ds.sizes["spectrum"]
    if keep.size == n:
        return path
    if keep.size == 0:  # fitted all the same: the fit's no_data warning names the likely cause
        print(f"none of the {n} spectra covers the {name} region: each gets status no_data (see the warning for why)")
        return path
    print(f"{keep.size} of {n} spectra cover the {name} region: fitting those (--no-coverage fits all {n})")
    sub = ds.isel(spectrum=keep)
    return sub.chunk({"spectrum": max(sub.chunksizes["spectrum"])}) if sub["flux"].chunks else sub


def _catalog_input(inputs: list[str], spectra: str, args) -> str:
    """The zarr store to catalogue: the one given, or the SDSS files given ingested into
    ``spectra`` (resumed: a second run reuses it)."""
    from .io import ingest_sdss, is_desi_file

    if len(inputs) == 1 and not inputs[0].lower().endswith((".fits", ".fits.gz", ".fit")):
        if args.spectra is not None:
            raise ValueError(f"--spectra is where FITS files given as input are ingested; {inputs[0]!r} is a zarr store: drop --spectra")
        return inputs[0]
    not_fits = [p for p in inputs if not p.lower().endswith((".fits", ".fits.gz", ".fit"))]
    if not_fits:
        raise ValueError(f"inputs {not_fits[:3]} are not FITS files; give one zarr store, or SDSS spec files (*.fits)")
    if is_desi_file(inputs[0]):
        raise ValueError("DESI files need their redshift catalogue: run sheap-dask ingest FILES... OUT.zarr --redshifts Z.fits, "
                         "then sheap-dask catalog OUT.zarr CATALOG")
    ds = ingest_sdss(inputs, spectra, chunk=args.chunk or 256, resume=True, progress=not args.no_progress)
    print(f"{spectra}: {ds.sizes.get('spectrum', 0)} spectra ingested from {len(inputs)} files")
    return spectra


def _cmd_catalog(args) -> int:
    import os

    import numpy as np

    from .catalog import fit_catalog
    from .errors import StoreExistsError
    from .io import export
    from .models.regions import REGIONS

    if len(args.paths) < 2:
        raise ValueError("give the input (a zarr store or SDSS spec files) and then the output, e.g. "
                         "sheap-dask catalog spectra.zarr catalog")
    *inputs, args.output = args.paths
    names = list(REGIONS) if args.regions == "auto" else args.regions.split(",")
    region_options = {n: o for n in names if (o := _region_options(args, n, strict=False))}
    if args.format == "zarr":
        if args.store is not None:
            raise ValueError("--store is for --format fits/parquet/csv (the catalogue store behind the file); with --format zarr "
                             "OUTPUT is the catalogue store: drop --store")
        store = args.output
    else:
        store = args.store or f"{args.output}.store"
        if os.path.exists(args.output) and not args.overwrite:
            raise StoreExistsError(f"OUTPUT {args.output!r} exists; pass --overwrite to replace it (or a new path)")
    fit_options = {k: v for k, v in (("method", args.method), ("num_steps", args.num_steps), ("fallback", args.fallback)) if v is not None}
    source = _catalog_input(inputs, args.spectra or f"{os.fspath(store).rstrip('/')}.spectra.zarr", args)
    with _cluster(args) as client:
        t0 = time.perf_counter()
        cat = fit_catalog(source, args.regions, client=client, store=store, resume=not args.no_resume, force=args.force,
                          n_mc=args.n_mc, n_samples=args.n_samples, region_options=region_options, fiducial=args.fiducial,
                          chunk_size=args.chunk, progress=not args.no_progress, fit_options=fit_options).load()
        elapsed = time.perf_counter() - t0
    n = cat.sizes.get("spectrum", 0)
    print(f"catalogue of {n} spectra in {elapsed:.1f} s: {store}")
    for name in names:
        if f"{name}_covered" not in cat:
            continue
        covered = np.asarray(cat[f"{name}_covered"].values)
        status = np.asarray(cat[f"{name}_status"].values)[covered] if f"{name}_status" in cat else np.zeros(0)
        ok = int(np.isin(status, [0, 1]).sum())
        print(f"  {name:6s} {int(covered.sum()):6d} spectra covered, {ok} converged")
    finite = np.isfinite(np.asarray(cat["log_mbh"].values))
    print(f"  fiducial log M_BH for {int(finite.sum())} of {n} spectra ({cat.attrs.get('fiducial_rule', '')})")
    if args.format != "zarr":
        path = getattr(export, f"to_{args.format}")(cat, args.output, overwrite=args.overwrite)
        print(f"written: {path} ({args.format})")
    return 0


def _cmd_info(args) -> int:
    import time as _time

    import xarray as xr

    from .errors import NotAStoreError
    from .store import _quiet_zarr, store_progress
    from .stores import LOCK_NAME, StoreLock, describe_path, filesystem

    info = describe_path(args.store)
    if info.kind != "fit":
        what = "nothing is there" if info.kind == "missing" else f"it is {info.what}"
        raise NotAStoreError(f"{args.store!r} is not a sheap_dask fit store: {what}. `sheap-dask info` reads the output of `sheap-dask fit`.")
    with _quiet_zarr():
        fits = xr.open_zarr(args.store)
    model = json.loads(fits.attrs.get("sheap_model", "{}"))
    options = json.loads(fits.attrs.get("sheap_options", "{}"))
    print(f"{args.store}: {fits.sizes.get('spectrum', 0)} spectra, {fits.sizes.get('param', 0)} parameters")
    print(f"model: {model.get('name', '?')} — {fits.attrs.get('model_description', '')}")
    print(f"sheap_dask version: {fits.attrs.get('sheap_version', '?')}")
    if fits.attrs.get("sheap_input"):
        print(f"input: {fits.attrs['sheap_input']}")
    progress = store_progress(args.store)
    if progress.complete:
        print(f"complete: {progress.n_chunks} of {progress.n_chunks} chunks done")
    else:
        print(f"PARTIAL: {progress.describe()}")
        print("  the rows of the missing chunks have status pending (never fitted); run the same `sheap-dask fit` again to finish")
    fs, root = filesystem(args.store)
    try:
        record = json.loads(fs.cat_file(f"{root.rstrip('/')}/{LOCK_NAME}"))
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict):
        age = _time.time() - float(record.get("heartbeat") or 0)
        print(f"locked by {StoreLock.describe(record)}, last heartbeat {age:.0f} s ago")
    _print_status(fits)
    print("options: " + ", ".join(f"{k}={v}" for k, v in sorted(options.items())))
    return 0


def _cmd_ingest(args) -> int:
    from .io import ingest_desi, ingest_sdss, is_desi_file

    if len(args.files) < 2:
        print("error: give one or more FITS files and then the output store", file=sys.stderr)
        return 2
    *files, out = args.files
    mask_bits = args.mask_bits if args.mask_bits in ("default", "all", "none") else [b.strip() for b in args.mask_bits.split(",")]
    common = dict(chunk=args.chunk, overwrite=args.overwrite, resume=args.resume, force=args.force, progress=not args.no_progress,
                  ebv=args.ebv, dereddening=args.dereddening, n_jobs=args.jobs, skip_bad=args.skip_bad)
    if is_desi_file(files[0]):  # DESI by its HDUs (FIBERMAP, *_FLUX), no flag needed
        ds = ingest_desi(files, out, redshifts=args.redshifts, qso_only=args.qso_only, **common)
    else:
        ds = ingest_sdss(
            files,
            out,
            mask_bits=mask_bits,
            wavelength_range=tuple(args.wavelength_range) if args.wavelength_range else None,
            **common,
        )
    print(f"{out}: {ds.sizes.get('spectrum', 0)} spectra x {ds.sizes.get('wavelength', 0)} pixels")
    skipped = ds.attrs.get("skipped_files")
    if skipped:
        lines = skipped.splitlines()
        print(f"skipped {len(lines)} unreadable file(s) (listed in the store's attrs['skipped_files']):")
        for line in lines[:10]:
            print(f"  {line}")
        if len(lines) > 10:
            print(f"  ... and {len(lines) - 10} more")
    return 0


def _print_status(fits) -> None:
    import numpy as np

    from .status import Status

    codes = np.asarray(fits.status.values)
    print("status counts:")
    for s in Status:
        count = int(np.sum(codes == s.value))
        if count:
            print(f"  {s.meaning:26s} {count}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
