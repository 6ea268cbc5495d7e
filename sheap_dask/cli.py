"""Command line: ``sheap-dask demo | fit | info | ingest``.

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
    previous_term = _terminate_as_interrupt()
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
        if previous_term is not None:
            import signal

            signal.signal(signal.SIGTERM, previous_term)


def _terminate_as_interrupt():
    """SIGTERM (``kill``, a Kubernetes pod deleted, ``helm upgrade``) stops a command like
    Ctrl-C: the store's lock is released and the cluster closed on the way out."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, handler)
    return None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning: ...`` paragraph, without the file and line of the code."""
    print(f"warning: {message}", file=file or sys.stderr)


def _quiet_shutdown() -> None:
    """After Ctrl-C: the cluster's closing chatter (tasks cancelled, workers killed) is not news."""
    for name in ("distributed", "tornado", "asyncio"):
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
    f.add_argument("--model", default="hbeta", help="built-in region: hbeta, halpha, mgii, civ (default hbeta)")
    f.add_argument("--n-broad", type=int, default=None, help="broad components of the region's broad line")
    f.add_argument("--no-feii", action="store_true", help="leave FeII out of the region model")
    f.add_argument("--chunk", type=int, default=None, help="spectra per chunk (default: the input's chunks)")
    f.add_argument("--no-resume", action="store_true", help="overwrite OUTPUT (a fit store) instead of resuming it")
    f.add_argument("--force", action="store_true", help="break a stale lock on OUTPUT (its writer was killed)")
    f.add_argument("--allow-no-data", action="store_true", help="exit 0 even when every spectrum is no_data (default: exit 3)")
    _add_fit_options(f)
    f.set_defaults(func=_cmd_fit)

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


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=None, type=_scheduler_arg, help="address of a running Dask scheduler (tcp://host:8786); default: a local cluster")
    p.add_argument("--method", default=None, choices=["lm", "adam", "lbfgs"], help="batched optimizer (default from config: lm)")
    p.add_argument("--num-steps", type=int, default=None, help="iteration budget of the batched solve")
    p.add_argument("--fallback", default=None, choices=["slsqp", "none"], help="re-fit failed spectra with SLSQP (default) or not")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def _region_model(args):
    from .models import region

    kwargs = {}
    if getattr(args, "n_broad", None) is not None:
        kwargs["n_broad"] = args.n_broad
    if getattr(args, "no_feii", False):
        kwargs["feii"] = False
    return region(args.model, **kwargs)


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
    with _cluster(args) as client:
        t0 = time.perf_counter()
        fits = fit_dataset(
            args.input, model, store=args.output, resume=not args.no_resume, force=args.force, client=client,
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
