"""Catalogue exports (sheap_dask.io.export): FITS, parquet and CSV read back with astropy and
pyarrow agree with the zarr catalogue value for value, with units, descriptions and flag
meanings intact and integer columns integer. The catalogue is assembled from the toy model's
hand-made fit result (tests/test_catalog_table.py): no fitting."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr
from derived_toy import MODEL
from test_catalog_table import fake_fits

import sheap_dask as sd
from sheap_dask import catalog_table as ct
from sheap_dask.derived import catalog as dc
from sheap_dask.errors import StoreExistsError
from sheap_dask.io import export


@pytest.fixture(scope="module")
def zarr_catalog(tmp_path_factory):
    fits = fake_fits()
    index = xr.DataArray(np.arange(5, dtype=np.uint32), dims=("spectrum",))
    table = ct.region_table(fits, MODEL, "toy", dc.region_plan(MODEL), flux_unit=1e-17, H0=70.0, Om0=0.3, index=index,
                            n_samples=32, seed=0).compute()
    z = np.array([0.3, 0.4, 0.5, 1.2, 1.5, 0.1, 2.2])
    coords = {"redshift": xr.Variable(("spectrum",), z, {"long_name": "redshift", "units": "1"}),
              "specname": xr.Variable(("spectrum",), np.array([f"spec-{i:04d}" for i in range(7)])),
              "plate": xr.Variable(("spectrum",), np.arange(7, dtype=np.int32) + 300)}
    cat = ct.assemble({"toy": (np.array([0, 2, 3, 4, 6]), table.drop_vars("spectrum"))}, coords, 7, "spectrum", redshift=z,
                      fiducial="dr16q", width_sigma=3.0, index=xr.DataArray(np.arange(100, 107), dims=("spectrum",))).compute()
    cat.attrs = {"title": "test catalogue", "sheap_version": sd.__version__, "n_spectra": 7}
    path = tmp_path_factory.mktemp("cat") / "catalog.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cat.to_zarr(path)
        return xr.open_zarr(path).load()


def _same(a, b, name):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "f":
        np.testing.assert_array_equal(a, b.astype(a.dtype), err_msg=name)  # NaN == NaN here
    elif a.dtype.kind in "biu":
        np.testing.assert_array_equal(a, b, err_msg=name)
    else:
        def text(v):
            return [x.decode() if isinstance(x, bytes) else str(x) for x in v]

        assert text(a) == text(b), name


def _ecsv(path):
    """An ECSV file as astropy reads it; an empty string is a missing value there (masked)."""
    from astropy.table import Table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log10(...) units stay text
        table = Table.read(path, format="ascii.ecsv")
    for name in table.colnames:
        if getattr(table[name], "mask", None) is not None and table[name].dtype.kind == "U":
            table[name] = table[name].filled("")
    return table


def _columns(cat):
    return {name: (values, attrs) for name, values, attrs in export.catalog_columns(cat)}


def test_fits_round_trip(zarr_catalog, tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    path = zarr_catalog.sheap.to_fits(tmp_path / "cat.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log(...) units are FITS function units astropy keeps as text
        table = Table.read(path, hdu="CATALOG")
    header = fits.getheader(path, "CATALOG")
    cols = _columns(zarr_catalog)
    assert table.colnames == list(cols) and "spectrum" in cols and "specname" in cols
    for i, (name, (values, attrs)) in enumerate(cols.items(), start=1):
        _same(values, table[name], name)
        if values.dtype.kind in "iu":
            assert table[name].dtype.kind in "iu", name
        assert header.get(f"TUNIT{i}", "") == export.fits_unit(attrs.get("units")), name
        assert header.get(f"TCOMM{i}") == attrs.get("long_name"), name
    i = list(cols).index("hbeta_broad_flags") + 1
    assert header[f"TFLAG{i}"].split()[:2] == ["1:not_detected", "2:param_at_bound"]
    i = list(cols).index("toy_status") + 1
    assert header[f"TFLAG{i}"].startswith("0:converged 1:converged_after_fallback")
    assert str(table["hbeta_broad_fwhm"].unit) == "km / s" and header[f"TUNIT{list(cols).index('log_mbh') + 1}"] == "log(solMass)"
    assert table["toy_status"].dtype.kind == "i" and table["hbeta_broad_detected"].dtype == bool
    assert fits.getheader(path, 0)["SHEAP_VERSION"] == sd.__version__
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        export.to_fits(zarr_catalog, path)


def test_parquet_round_trip(zarr_catalog, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = zarr_catalog.sheap.to_parquet(tmp_path / "cat.parquet")
    table = pq.read_table(path)
    schema = table.schema
    units = json.loads(schema.metadata[b"sheap_units"])
    meanings = json.loads(schema.metadata[b"sheap_flag_meanings"])
    for name, (values, attrs) in _columns(zarr_catalog).items():
        got = table[name].to_numpy(zero_copy_only=False)
        _same(values, got, name)
        kind = {"O": "U"}.get(np.dtype(got.dtype).kind, np.dtype(got.dtype).kind)  # pyarrow strings come as objects
        assert kind == values.dtype.kind, name  # integers stay integers, bools bools
        field = schema.field(name).metadata
        assert field[b"units"].decode() == str(attrs.get("units", "")), name
        assert field[b"long_name"].decode() == str(attrs.get("long_name", "")), name
        if "units" in attrs:
            assert units[name] == attrs["units"]
    assert units["log_mbh"] == "log10(M/M_sun)" and units["hbeta_broad_flux"] == "1e-17 erg/s/cm2"
    assert meanings["flags"].startswith("1:broad_width_mismatch") and json.loads(schema.field("toy_status").metadata[b"flag_values"])[0] == 0
    assert json.loads(schema.metadata[b"sheap_attrs"])["title"] == "test catalogue"


def test_csv_round_trip(zarr_catalog, tmp_path):
    path = zarr_catalog.sheap.to_csv(tmp_path / "cat.csv")
    table = _ecsv(path)
    for name, (values, attrs) in _columns(zarr_catalog).items():
        _same(values, table[name], name)
        if values.dtype.kind in "iu":
            assert table[name].dtype.kind in "iu", name
        assert (str(table[name].unit) if table[name].unit is not None else "1") == str(attrs.get("units", "1")).replace(
            "erg/s/cm2", "erg / (s cm2)").replace("km/s", "km / s"), name
        assert table[name].description == attrs.get("long_name"), name
    assert table["hbeta_broad_flags"].meta["flag_meanings"].split()[0] == "not_detected"
    assert table.meta["title"] == "test catalogue"
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(path, comment="#")
    np.testing.assert_array_equal(frame["toy_n_iter"].to_numpy(), zarr_catalog["toy_n_iter"].values)


def test_the_three_files_agree(zarr_catalog, tmp_path):
    """The same catalogue from the FITS, parquet and CSV files, value for value."""
    from astropy.table import Table

    pq = pytest.importorskip("pyarrow.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = Table.read(export.to_fits(zarr_catalog, tmp_path / "c.fits"), hdu="CATALOG")
    c = _ecsv(export.to_csv(zarr_catalog, tmp_path / "c.csv"))
    b = pq.read_table(export.to_parquet(zarr_catalog, tmp_path / "c.parquet"))
    for name in a.colnames:
        _same(np.asarray(a[name]), b[name].to_numpy(zero_copy_only=False), name)
        _same(np.asarray(a[name]), np.asarray(c[name]), name)


def test_missing_pyarrow_names_the_extra(zarr_catalog, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(sd.errors.MissingDependencyError, match=r"sheap-dask\[parquet\]"):
        export.to_parquet(zarr_catalog, tmp_path / "x.parquet")
