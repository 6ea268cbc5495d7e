"""The catalogue job: every region each spectrum covers, fitted and measured, one row per spectrum.

:func:`fit_catalog` picks, per spectrum, the built-in regions its rest-frame coverage supports
(the coverage rule of :mod:`sheap_dask.coverage`, the one the fit itself applies), fits each
region on its sub-selection with :func:`~sheap_dask.fit.fit_dataset` on one cluster (the
regions' chunks are submitted together), measures each region's catalogue columns with one
Monte Carlo run per chunk (:func:`sheap_dask.catalog_table.region_table`) and assembles one
row per input spectrum (:func:`sheap_dask.catalog_table.assemble`).

A catalogue store (``store=``) is a directory::

    OUT/sheap_catalog.json      what the catalogue is (regions, models, options, input); "complete" once written
    OUT/sheap_lock.json         one writer at a time (sheap_dask.stores.StoreLock)
    OUT/regions/<region>.zarr   each region's fit store (fit_dataset(store=...): chunk by chunk, resumable)
    OUT/catalog.zarr            the assembled catalogue, written last

so an interrupted catalogue resumes: finished regions and chunks are not refitted, and the
catalogue assembled at the end is the one an uninterrupted run makes.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import catalog_table as ct
from ._version import __version__
from .errors import InputDataError, OptionError, ResumeMismatchError
from .stores import CATALOG_RECORD

logger = logging.getLogger("sheap_dask.catalog")

__all__ = ["CONTINUUM_WAVELENGTHS", "catalog_regions", "fit_catalog", "open_catalog"]

#: Continuum luminosities each region reports (rest Angstrom; DR16Q's L1350, L3000, L5100),
#: besides those its mass recipes need.
CONTINUUM_WAVELENGTHS: dict[str, tuple[float, ...]] = {"hbeta": (5100.0,), "halpha": (), "mgii": (3000.0,), "civ": (1350.0,)}
RECORD = CATALOG_RECORD  # marks the directory as ours (sheap_dask.stores.describe_path)
CATALOG_NAME = "catalog.zarr"
REGIONS_DIR = "regions"
#: spectra per block when testing coverage (keeps memory flat on large inputs)
COVERAGE_BLOCK = 4096


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------
def catalog_regions(regions: str | Sequence[str] | Mapping[str, Any] = "auto", region_options: Mapping | None = None) -> dict:
    """``{name: model}`` of the catalogue's regions.

    ``regions``: ``"auto"`` (every built-in region: hbeta, halpha, mgii, civ), a comma-separated
    string or a sequence of region names, or a mapping ``name -> Model`` (own models).
    ``region_options``: ``{region: {keyword: value}}`` passed to :func:`sheap_dask.models.region`
    (e.g. ``{"hbeta": {"oiii_wing": True}}``).
    """
    from . import models
    from .model import Model

    known = list(models.REGIONS)
    options = {str(k): dict(v) for k, v in (region_options or {}).items()}
    if isinstance(regions, Mapping):
        out = {}
        for name, model in regions.items():
            if not isinstance(model, Model):
                raise OptionError(f"regions[{name!r}] is a {type(model).__name__}; a mapping of regions holds sheap_dask.Model "
                                  "objects, e.g. {'hbeta': sd.models.region('hbeta', oiii_wing=True)}.")
            out[str(name)] = model
        names = list(out)
    else:
        if isinstance(regions, str):
            names = known if regions.strip() == "auto" else [r.strip() for r in regions.split(",") if r.strip()]
        else:
            names = [str(r) for r in regions]
        if not names:
            raise OptionError(f"regions={regions!r} names no region; use 'auto' or some of {', '.join(known)}.")
        bad = [r for r in names if r not in known]
        if bad:
            raise OptionError(f"regions: unknown region(s) {', '.join(map(repr, bad))}; use 'auto' or some of {', '.join(known)} "
                              "(or a mapping name -> sd.Model for own models).")
        if len(set(names)) != len(names):
            raise OptionError(f"regions={regions!r} names a region twice.")
        out = {}
        for name in names:
            try:
                out[name] = models.region(name, **options.get(name, {}))
            except TypeError as exc:
                raise OptionError(f"region_options[{name!r}]={options.get(name)!r}: {exc}; see sd.models.region's "
                                  "keywords (n_broad, feii, oiii_wing, host, continuum, ...).") from None
    extra = set(options) - set(names)
    if extra:
        raise OptionError(f"region_options names region(s) {sorted(extra)} that the catalogue does not fit (regions: "
                          f"{', '.join(names)}); drop them or add them to regions.")
    return out


def _open_input(ds, storage_options) -> tuple[xr.Dataset, str | None]:
    if isinstance(ds, (str, os.PathLike)):
        from .inputs import open_store

        return open_store(str(ds), storage_options), str(ds)
    if not isinstance(ds, xr.Dataset):
        raise InputDataError(f"ds must be an xarray.Dataset or the path/URL of a zarr store, got {type(ds).__name__}; "
                             "e.g. fit_catalog(xr.open_zarr('spectra.zarr')).")
    return ds, ds.encoding.get("source")


def _covering(ds: xr.Dataset, model, *, dim: str, flux: str, ivar: str, redshift: str) -> np.ndarray:
    """Positions of the spectra ``model`` can fit (:func:`sheap_dask.coverage.covering`)."""
    return _covering_all(ds, {"m": model}, dim=dim, flux=flux, ivar=ivar, redshift=redshift)["m"]


def _covering_all(ds: xr.Dataset, models: Mapping, *, dim: str, flux: str, ivar: str, redshift: str) -> dict[str, np.ndarray]:
    """Per model, the positions of the spectra it can fit: the input read once, block by block
    (memory stays flat; every region is tested on each block)."""
    from .coverage import covering

    n = ds.sizes[dim]
    view = ds[[v for v in (flux, ivar, redshift, "wavelength") if v in ds.data_vars]]
    view = view.rename({flux: "flux", ivar: "ivar"}) if (flux, ivar) != ("flux", "ivar") else view
    out: dict[str, list] = {name: [] for name in models}
    for start in range(0, n, COVERAGE_BLOCK):
        block = view.isel({dim: slice(start, start + COVERAGE_BLOCK)})
        if dim != "spectrum":
            block = block.rename({dim: "spectrum"})
        block = block.load()
        for name, model in models.items():
            out[name].append(start + covering(block, model, redshift=redshift))
    return {name: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64) for name, parts in out.items()}


def _text(values) -> np.ndarray:
    """Plain ``str`` (zarr v3 returns strings as numpy's StringDType or objects)."""
    values = np.asarray(values)
    if values.dtype.kind in "biufcmM":
        return values
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values.ravel()], dtype=str).reshape(values.shape)


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------
def fit_catalog(
    ds: xr.Dataset | str | os.PathLike,
    regions: str | Sequence[str] | Mapping[str, Any] = "auto",
    *,
    client=None,
    store: str | os.PathLike | None = None,
    resume: bool = True,
    force: bool = False,
    n_mc: int | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    region_options: Mapping[str, Mapping[str, Any]] | None = None,
    fiducial: str | Sequence | None = "dr16q",
    width_sigma: float = 3.0,
    H0: float | None = None,
    Om0: float | None = None,
    dim: str = "spectrum",
    flux: str = "flux",
    ivar: str = "ivar",
    redshift: str = "redshift",
    chunk_size: int | None = None,
    progress: bool | None = None,
    fit_options: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """A quasar catalogue: every region each spectrum covers, fitted and measured, one row per spectrum.

    Parameters
    ----------
    ds : xarray.Dataset or str or path
        Spectra as for :func:`~sheap_dask.fit.fit_dataset` (``flux``, ``ivar``, a
        ``wavelength`` grid in Angstrom and a per-spectrum ``redshift``), or a zarr store path.
    regions : "auto", str, list of str or mapping
        ``"auto"``: every built-in region (hbeta, halpha, mgii, civ); a list (or a
        comma-separated string) of region names; or ``{name: sd.Model}``. Each spectrum is fitted
        with the regions its rest-frame coverage supports (:mod:`sheap_dask.coverage`).
    client : distributed.Client, optional
        Cluster for every region's fit (default: the current client, else a ``LocalCluster``
        started and closed here). The regions run side by side on it.
    store : str or path, optional
        Catalogue directory: each region's fit streams into ``store/regions/<region>.zarr``
        (resumable chunk by chunk), the catalogue into ``store/catalog.zarr`` at the end.
        Must be missing, empty or a catalogue store; nothing else is ever replaced.
    resume : bool
        With ``store``: keep what is done (regions, chunks, the catalogue) after checking that
        regions, models, options and input are the same. ``False`` replaces a catalogue store.
    force : bool
        Break a stale lock (of a killed writer).
    n_mc : int, optional
        Resampling Monte Carlo realizations per fit (``fit_dataset(n_mc=...)``; DR16Q: 25).
        Without them, errors come from correlated draws of the parameter covariance.
    n_samples, seed : int
        Draws of the measurement Monte Carlo (:mod:`sheap_dask.derived.errors`) and its seed.
    region_options : mapping, optional
        ``{region: {keyword: value}}`` for :func:`sheap_dask.models.region`, e.g.
        ``{"hbeta": {"oiii_wing": True}}``.
    fiducial : str or list of (z_max, recipe)
        The fiducial ``log_mbh``: ``"dr16q"`` (H-beta below z 0.8, MgII to 1.9, CIV above), a
        recipe or region name, or ``(z_max, recipe)`` pairs
        (:func:`sheap_dask.catalog_table.fiducial_recipes`).
    width_sigma : float
        Threshold of the H-beta/H-alpha broad-width consistency flag.
    H0, Om0 : float, optional
        Flat LambdaCDM cosmology (default ``sheap_dask.cosmology.*``: 70, 0.3).
    dim, flux, ivar, redshift : str
        Names in ``ds``.
    chunk_size : int, optional
        Spectra per chunk of each region's fit (default: the input's chunking, else
        ``fit_dataset``'s).
    progress : bool, optional
        One progress bar per region (default: when stderr is a terminal).
    fit_options : mapping, optional
        Further keywords of :func:`~sheap_dask.fit.fit_dataset` (``method``, ``num_steps``,
        ``fallback``, ...), the same for every region.
    storage_options : mapping, optional
        fsspec options of URL paths.

    Returns
    -------
    xarray.Dataset
        One row per input spectrum along ``dim``: per line ``<line>_<q>`` and ``<line>_<q>_err``
        for q in peak, flux, log_lum, fwhm, sigma, ew, shift, with ``<line>_detected`` and
        ``<line>_flags``; ``log_l1350/3000/5100``, host fractions, FeII EWs and ``r_feii``;
        ``log_mbh_<recipe>`` for every applicable recipe, the fiducial ``log_mbh`` with its
        ``mbh_recipe``, ``log_lbol``, ``log_edd_ratio``; per region ``<region>_status``,
        ``_quality``, ``_chi2_nu``, ``_n_iter``, ``_method``, ``_covered``; ``flags``; the
        input's per-spectrum coordinates. Every variable has CF ``long_name`` and ``units``
        (flags ``flag_masks``/``flag_meanings``); provenance in ``attrs``. In memory without
        ``store``; opened lazily from ``store/catalog.zarr`` with it.

    Examples
    --------
    >>> import sheap_dask as sd
    >>> cat = sd.fit_catalog("spectra.zarr", store="catalog", n_mc=25)  # doctest: +SKIP
    >>> cat[["hbeta_broad_fwhm", "log_l5100", "log_mbh", "mbh_recipe"]].to_dataframe()  # doctest: +SKIP
    """
    from . import config
    from .cluster import using_client
    from .derived.errors import DEFAULT_N_SAMPLES
    from .derived.luminosity import cosmology

    ds, source = _open_input(ds, storage_options)
    if dim not in ds.dims:
        raise InputDataError(f"dim={dim!r} is not a dimension of ds (dims: {list(ds.dims)}); pass dim=<the spectrum dimension>.")
    for name, arg in ((flux, "flux"), (ivar, "ivar")):
        if name not in ds.variables:
            raise InputDataError(f"{arg}={name!r} is not a variable of ds (variables: {sorted(map(str, ds.variables))}); "
                                 f"pass {arg}=<its name>.")
    if dim not in ds.coords:  # positions as the spectrum label: each region's fits name the rows they hold
        ds = ds.assign_coords({dim: np.arange(ds.sizes[dim])})
    models = catalog_regions(regions, region_options)
    ct.fiducial_rule(fiducial)  # validated before any work
    if width_sigma is None or not float(width_sigma) > 0:
        raise OptionError(f"width_sigma={width_sigma!r}: a positive number of sigma, e.g. 3.")
    n_samples = int(n_samples or DEFAULT_N_SAMPLES)
    H0, Om0 = cosmology(H0, Om0)
    fit_options = dict(fit_options or {})
    reserved = {"store", "resume", "client", "n_mc", "progress", "force", "chunk_size", "dim", "flux", "ivar", "redshift", "storage_options"}
    if reserved & set(fit_options):
        raise OptionError(f"fit_options holds {sorted(reserved & set(fit_options))}: give these to fit_catalog itself.")
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    n = ds.sizes[dim]
    chunk = int(chunk_size) if chunk_size else (int(ds[flux].chunks[0][0]) if ds[flux].chunks else None)

    # which spectra each region fits
    positions = _covering_all(ds, models, dim=dim, flux=flux, ivar=ivar, redshift=redshift)
    for name, pos in positions.items():
        logger.info("catalogue: %s covers %d of %d spectra", name, pos.size, n)
    options = {"n_mc": n_mc, "n_samples": n_samples, "seed": int(seed), "fiducial": fiducial, "width_sigma": float(width_sigma),
               "H0": H0, "Om0": Om0, "chunk": chunk, "fit_options": fit_options}
    spec = _Spec(ds, source, models, positions, options, dim, redshift)

    so = dict(storage_options) if storage_options else None
    if store is not None:
        from .stores import preflight

        preflight(store, "catalog", [source], storage_options=so, force=force)
        return _with_store(spec, store, resume, force, client, progress, so, flux=flux, ivar=ivar)
    with using_client(client) as client:
        tables = _fit_regions(spec, client, progress, stores=None, resume=resume, force=force, so=so, flux=flux, ivar=ivar)
    config.warn_unknown_keys()
    return _assemble(spec, tables)


class _Spec:
    """Everything the catalogue is made from (its identity and the region sub-selections)."""

    def __init__(self, ds, source, models, positions, options, dim, redshift):
        self.ds, self.source, self.models, self.positions, self.options = ds, source, models, positions, options
        self.dim, self.redshift = dim, redshift
        self.n = ds.sizes[dim]
        self.flux_unit = _flux_unit(ds)

    def region_attrs(self) -> dict:
        return {name: {"model_identity": m.identity(), "model_fingerprint": m.fingerprint(),
                       "region_spec": (m.metadata or {}).get("region_spec"), "n_fitted": int(self.positions[name].size)}
                for name, m in self.models.items()}

    def identity(self) -> dict:
        z = np.asarray(self.ds[self.redshift].values, dtype=np.float64) if self.redshift in self.ds.variables else np.zeros(0)
        coord = np.asarray(self.ds[self.dim].values) if self.dim in self.ds.coords else np.arange(self.n)
        digest = hashlib.sha256(z.tobytes() + _text(coord).astype(str).tobytes()).hexdigest()[:16]
        opts = {k: v for k, v in self.options.items()}
        opts["fiducial"] = ct.describe_fiducial(opts["fiducial"])
        return {"regions": {k: v["model_identity"] for k, v in self.region_attrs().items()}, "options": opts,
                "n_spectra": int(self.n), "input_digest": digest, "version": 1}


def _flux_unit(ds) -> float:
    from .units import DEFAULT_FLUX_UNIT, parse_flux_unit

    units = ds["flux"].attrs.get("units") if "flux" in ds else None
    units = units or ds.attrs.get("flux_units")
    try:
        return float(parse_flux_unit(units)) if units else DEFAULT_FLUX_UNIT
    except Exception:  # noqa: BLE001 - an unparsable unit: SDSS's, as fits.sheap does
        return DEFAULT_FLUX_UNIT


def _sub(spec: _Spec, name: str) -> xr.Dataset:
    sub = spec.ds.isel({spec.dim: spec.positions[name]})
    chunk = spec.options["chunk"]
    if chunk:
        sub = sub.chunk({spec.dim: chunk})
    elif sub[next(iter(sub.data_vars))].chunks:  # a fancy-indexed selection has uneven chunks
        sub = sub.chunk({spec.dim: max(sub.chunksizes[spec.dim])})
    return sub


#: the variables of a fit result that catalog_table.region_table reads
TABLE_INPUTS = ("params", "params_mc", "params_cov", "params_err", "status", "quality", "redchi2", "n_iter", "method", "n_masked",
                "at_bound", "line_detected")


def _region_table(spec: _Spec, name: str, fits: xr.Dataset, client=None) -> xr.Dataset:
    """The region's catalogue columns, in memory: one task per chunk of ``fits`` that computes
    the chunk's whole table in numpy on a worker (a graph of every column's operations would be
    thousands of tiny tasks that cost more than the measurement); the chunks' tables are then
    put together here."""
    import dask

    from .derived.catalog import region_plan

    model = spec.models[name]
    region = (model.metadata or {}).get("region_spec", {}) or {}
    base = region.get("name", name) if isinstance(region, Mapping) else name
    plan = region_plan(model, wavelengths=CONTINUUM_WAVELENGTHS.get(str(base), CONTINUUM_WAVELENGTHS.get(name, ())))
    index = xr.DataArray(spec.positions[name].astype(np.uint32), dims=(spec.dim,), coords={spec.dim: fits[spec.dim].values})
    o = spec.options
    options = {"model": model, "region": name, "plan": plan, "flux_unit": spec.flux_unit, "H0": o["H0"], "Om0": o["Om0"],
               "n_samples": o["n_samples"], "seed": o["seed"], "redshift": spec.redshift}
    source = fits[[v for v in TABLE_INPUTS if v in fits]].assign(_index=index)
    if not source["params"].chunks:
        return _table_block(source, **options)
    bounds = np.concatenate([[0], np.cumsum(source["params"].chunks[0])])
    shared = dask.delayed(options, pure=True, traverse=False)  # the model once in the graph, not per task
    tasks = [dask.delayed(_table_block_shared, pure=True)(source.isel({spec.dim: slice(int(a), int(b))}), shared)
             for a, b in itertools.pairwise(bounds)]
    parts = dask.compute(*tasks) if client is None else client.gather(client.compute(tasks))
    return xr.concat(parts, dim=spec.dim, data_vars="all", coords="minimal", compat="override", join="exact", combine_attrs="override")


def _table_block_shared(block: xr.Dataset, options: Mapping) -> xr.Dataset:
    return _table_block(block, **options)


def _table_block(block: xr.Dataset, *, model, region, plan, flux_unit, H0, Om0, n_samples, seed, redshift):
    """Worker side: one chunk of a region's fits -> its catalogue columns (in memory)."""
    index = block["_index"]
    table = ct.region_table(block.drop_vars("_index"), model, region, plan, flux_unit=flux_unit, H0=H0, Om0=Om0, index=index,
                            n_samples=n_samples, seed=seed, redshift=redshift)
    return table.compute()


def _fit_one(spec: _Spec, name: str, client, store, resume, force, so, flux, ivar, tick) -> xr.Dataset:
    """One region: fit its sub-selection, measure its table (in memory)."""
    from .fit import fit_dataset

    t0 = time.perf_counter()
    if spec.positions[name].size == 0:
        return None
    fits = fit_dataset(_sub(spec, name), spec.models[name], client=client, store=store, resume=resume, force=force,
                       progress=False, n_mc=spec.options["n_mc"], dim=spec.dim, flux=flux, ivar=ivar, redshift=spec.redshift,
                       storage_options=so, **spec.options["fit_options"])
    table = _region_table(spec, name, fits, client)
    tick(name, time.perf_counter() - t0)
    return table, fits.attrs


def _fit_regions(spec: _Spec, client, progress, *, stores, resume, force, so, flux, ivar) -> dict:
    """Every region's table, the regions side by side on ``client`` (threads that each submit
    their region's chunks: the scheduler runs them as the cluster has room)."""
    names = [r for r in spec.models if spec.positions[r].size]
    bars = _Bars(names, spec, stores, progress)
    results: dict[str, Any] = {}

    def run(name):
        store = stores[name] if stores else None
        return _fit_one(spec, name, client, store, resume, force, so, flux, ivar, bars.done)

    if client is None or len(names) <= 1:  # the local scheduler: one region after the other
        for name in names:
            results[name] = run(name)
    else:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="sheap-catalog")
        futures = {name: pool.submit(contextvars.copy_context().run, run, name) for name in names}
        try:
            while not all(f.done() for f in futures.values()):
                bars.poll()
                concurrent.futures.wait(futures.values(), timeout=0.5, return_when=concurrent.futures.FIRST_EXCEPTION)
                if any(f.done() and f.exception() is not None for f in futures.values()):
                    break
            for name, f in futures.items():
                results[name] = f.result()  # the first region that failed raises here
        except BaseException:
            # Ctrl-C or a failed region: return now; the caller closes the cluster, which ends
            # the other regions' threads (their stores keep what is done, for a resume)
            pool.shutdown(wait=False, cancel_futures=True)
            bars.close()
            raise
        pool.shutdown(wait=True)
    bars.close()
    return results


class _Bars:
    """A progress bar per region (chunks done, read from its fit store), or log lines."""

    def __init__(self, names, spec, stores, enabled):
        self.stores, self.enabled, self.bars, self.finished = stores, enabled, {}, set()
        self.lock = threading.Lock()
        if enabled:
            from tqdm.auto import tqdm

            for i, name in enumerate(names):
                n_chunks = max(1, -(-spec.positions[name].size // (spec.options["chunk"] or spec.positions[name].size)))
                self.bars[name] = tqdm(total=n_chunks, desc=f"{name:>7s} ({spec.positions[name].size} spectra)", unit="chunk",
                                       position=i, leave=True)

    def poll(self):
        if not self.bars or not self.stores:
            return
        from .store import store_progress

        for name, bar in self.bars.items():
            if name in self.finished:  # its clock stops at "done in ..."
                continue
            try:
                p = store_progress(self.stores[name])
            except Exception:  # noqa: BLE001, S112 - not created yet
                continue
            with self.lock:
                bar.total = p.n_chunks
                bar.n = p.n_done
                bar.refresh()

    def done(self, name, seconds):
        logger.info("catalogue: region %s done in %.1f s", name, seconds)
        bar = self.bars.get(name)
        if bar is not None:
            with self.lock:
                self.finished.add(name)
                bar.n = bar.total
                bar.set_postfix_str(f"done in {seconds:.1f} s")
                bar.refresh()

    def close(self):
        for bar in self.bars.values():
            bar.close()


def _assemble(spec: _Spec, results: Mapping[str, Any]) -> xr.Dataset:
    ds, dim = spec.ds, spec.dim
    tables = {}
    seen: dict[str, str] = {}
    for name, res in results.items():
        if res is None:
            continue
        table, _ = res
        for v in table.data_vars:
            if v in seen:  # two regions measuring one column would silently overwrite each other
                raise OptionError(f"regions {seen[v]!r} and {name!r} both measure {v!r}; fit them in separate catalogues or "
                                  "restrict one region's lines.")
            seen[v] = name
        tables[name] = (spec.positions[name], table.drop_vars(dim, errors="ignore").load())
    coords = {}
    for cname, c in ds.coords.items():
        if c.dims == (dim,) and cname != dim:
            values = _text(c.values)
            attrs = dict(c.attrs)
            attrs.setdefault("long_name", f"{cname} of the spectrum (from the input)")
            if cname == spec.redshift:
                attrs.setdefault("units", "1")
            coords[str(cname)] = xr.Variable((dim,), values, attrs)
    z = np.asarray(ds[spec.redshift].values, dtype=np.float64) if spec.redshift in ds.variables else None
    index = ds[dim].values if dim in ds.coords else np.arange(spec.n)
    o = spec.options
    cat = ct.assemble(tables, coords, spec.n, dim, redshift=z, fiducial=o["fiducial"], width_sigma=o["width_sigma"],
                      index=xr.DataArray(index, dims=(dim,), attrs={"long_name": "spectrum index of the input"}))
    cat = cat.compute()
    for name in spec.models:  # regions no spectrum covers: their coverage column still says so
        if f"{name}_covered" not in cat:
            cat[f"{name}_covered"] = xr.DataArray(np.zeros(spec.n, dtype=bool), dims=(dim,), attrs={
                "long_name": f"the spectrum covers the {name} region (coverage rule, sheap_dask.coverage) and it was fitted",
                "units": "1"})
    for v in cat.data_vars.values():  # zarr v3 strings -> plain str
        if v.dtype.kind not in "biufcmM":
            v.values = _text(v.values)
    regions = spec.region_attrs()
    for name, res in results.items():
        if res is not None:
            fit_attrs = res[1]
            regions[name]["fit_options"] = json.loads(fit_attrs.get("sheap_options", "{}"))
            regions[name]["fit_fingerprint"] = fit_attrs.get("sheap_fit_fingerprint")
    cat.attrs = {
        "title": "sheap_dask quasar catalogue",
        "sheap_accessor": "import sheap_dask, then cat.sheap.plot_object(i), plot_overview(), to_fits(path), to_parquet(path), "
                          "to_csv(path), status_names('<region>_status')",
        "Conventions": "CF-1.10",
        "sheap_store": "catalog",
        "sheap_version": __version__,
        "sheap_regions": json.dumps(regions, sort_keys=True, default=str),
        "sheap_catalog_options": json.dumps(spec.identity()["options"], sort_keys=True, default=str),
        "sheap_catalog_fingerprint": hashlib.sha256(json.dumps(spec.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16],
        "sheap_input": str(spec.source) if spec.source else "in-memory Dataset",
        "n_spectra": int(spec.n),
        "fiducial_rule": ct.describe_fiducial(o["fiducial"]),
        "cosmology": f"flat LambdaCDM H0={o['H0']:g} Om0={o['Om0']:g}",
        "flux_unit": f"{spec.flux_unit:g} erg/s/cm2/Angstrom",
        "monte_carlo": f"{o['n_samples']} draws (seed {o['seed']}) per spectrum from "
                       + (f"{o['n_mc']} resampling realizations (params_mc)" if o["n_mc"] else "the parameter covariance"),
    }
    return cat


# --------------------------------------------------------------------------------------
# The catalogue store
# --------------------------------------------------------------------------------------
def _with_store(spec: _Spec, store, resume, force, client, progress, so, *, flux, ivar) -> xr.Dataset:
    from .cluster import using_client
    from .stores import (
        StoreLock,
        clear_store,
        describe_path,
        filesystem,
        refuse_foreign,
        spell,
    )

    fs, root = filesystem(store, so)
    root = root.rstrip("/")
    identity = spec.identity()
    with StoreLock(store, so, force=force, purpose="fit_catalog"):
        info = describe_path(store, so)
        refuse_foreign(info, "catalog")
        if info.kind == "catalog":
            record = json.loads(fs.cat_file(f"{root}/{RECORD}"))
            if not resume:
                logger.info("store %s: replacing the catalogue store (resume=False)", store)
                clear_store(store, info, so)
            else:
                diffs = _differences(record.get("identity", {}), identity)
                if diffs:
                    raise ResumeMismatchError(
                        f"store {os.fspath(store)!r} holds another catalogue; it differs in: " + "; ".join(diffs)
                        + f". Resume it with the same regions, options and input, or pass {spell('resume=False')} to replace it "
                        "(or a new path).")
                if record.get("complete") and fs.exists(f"{root}/{CATALOG_NAME}"):
                    logger.info("store %s: the catalogue is complete; nothing to do", store)
                    return _open(store, so)
        record = {"sheap_store": "catalog", "identity": identity, "complete": False, "sheap_version": __version__,
                  "created": time.time()}
        fs.makedirs(root, exist_ok=True)
        if not fs.exists(f"{root}/{RECORD}"):  # a fresh store (resume: the record stays as it was)
            fs.pipe_file(f"{root}/{RECORD}", json.dumps(record, indent=1, default=str).encode())
        stores = {name: f"{os.fspath(store).rstrip('/')}/{REGIONS_DIR}/{name}.zarr" for name in spec.models}
        with using_client(client) as client:
            tables = _fit_regions(spec, client, progress, stores=stores, resume=True, force=force, so=so, flux=flux, ivar=ivar)
        cat = _assemble(spec, tables)
        target = f"{os.fspath(store).rstrip('/')}/{CATALOG_NAME}"
        if fs.exists(f"{root}/{CATALOG_NAME}"):  # an interrupted write of ours: the record says incomplete
            fs.rm(f"{root}/{CATALOG_NAME}", recursive=True)
        from .store import _quiet_zarr

        with _quiet_zarr():
            cat.to_zarr(target, mode="w", storage_options=so)
        record["complete"] = True
        fs.pipe_file(f"{root}/{RECORD}", json.dumps(record, indent=1, default=str).encode())
    return _open(store, so)


def _differences(old: Mapping, new: Mapping) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str):
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        else:
            out.append(f"{key}: stored {str(a)[:60]!r}, now {str(b)[:60]!r}")
    return out


def _open(store, so) -> xr.Dataset:
    from .store import _quiet_zarr

    with _quiet_zarr():
        cat = xr.open_zarr(f"{os.fspath(store).rstrip('/')}/{CATALOG_NAME}", storage_options=so)
    for name, v in cat.variables.items():
        if v.dtype.kind not in "biufcmM":
            cat[name] = cat[name].copy(data=_text(v.values))
    return cat


def open_catalog(store: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open the catalogue of a catalogue store written by :func:`fit_catalog` or ``sheap-dask catalog``.

    Raises
    ------
    NotAStoreError
        ``store`` is not a catalogue store, or its catalogue was never finished (run the same
        ``fit_catalog`` again: it resumes).
    """
    from .errors import NotAStoreError
    from .stores import describe_path, filesystem

    so = dict(storage_options) if storage_options else None
    info = describe_path(store, so)
    if info.kind != "catalog":
        raise NotAStoreError(f"{os.fspath(store)!r} is not a sheap_dask catalogue store: "
                             + ("nothing is there" if info.kind == "missing" else f"it is {info.what}")
                             + ". Catalogue stores are written by fit_catalog(..., store=...) and sheap-dask catalog.")
    fs, root = filesystem(store, so)
    record = json.loads(fs.cat_file(f"{root.rstrip('/')}/{RECORD}"))
    if not record.get("complete"):
        raise NotAStoreError(f"{os.fspath(store)!r} is an unfinished catalogue store (interrupted before the catalogue was "
                             "written); run the same fit_catalog / sheap-dask catalog again to resume it.")
    return _open(store, so)

