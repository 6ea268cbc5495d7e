"""Tests of sheap_dask.io.tables: (wavelength, flux, error) tables and quasar-catalogue op files."""

from __future__ import annotations

import numpy as np
import pytest

from sheap_dask import io as sio
from sheap_dask.errors import OptionError

fits = pytest.importorskip("astropy.io.fits")


def test_table_reader_on_csv(shared_spectra):
    path = next((shared_spectra / "qsofitmore_example").glob("*.csv"))
    raw = np.loadtxt(path, delimiter=",", skiprows=1)
    ds = sio.read_table_spectrum(path, redshift=0.1684)
    assert ds.flux.dims == ("spectrum", "wavelength") and ds.sizes["spectrum"] == 1
    assert ds.sizes["wavelength"] == raw.shape[0]
    np.testing.assert_allclose(ds.wavelength.values, raw[:, 0])
    np.testing.assert_allclose(ds.flux.values[0], raw[:, 1].astype(np.float32))
    np.testing.assert_allclose(ds.ivar.values[0], (1.0 / raw[:, 2] ** 2).astype(np.float32), rtol=1e-6)
    assert float(ds.redshift[0]) == 0.1684
    scaled = sio.read_table_spectrum(path, flux_scale=1e-17, flux_units="1e-17 erg/s/cm2/A")
    assert "redshift" not in scaled.coords
    np.testing.assert_allclose(scaled.flux.values[0], raw[:, 1] / 1e-17, rtol=1e-6)
    np.testing.assert_allclose(scaled.ivar.values[0], 1e-34 / raw[:, 2] ** 2, rtol=1e-5)
    explicit = sio.read_table_spectrum(path, columns=["lam", "flux", "err"])
    np.testing.assert_array_equal(explicit.flux.values, ds.flux.values)


def test_table_reader_whitespace_and_bad_errors(tmp_path):
    p = tmp_path / "spec.txt"
    p.write_text("# a comment\n5002.0 1.0 0.5\n5000.0 2.0 0.1\n5004.0 3.0 -1\n5006.0 nan 0.2\n5008.0 1.0 inf\n")
    ds = sio.read_table_spectrum(p)
    np.testing.assert_array_equal(ds.wavelength.values, [5000.0, 5002.0, 5004.0, 5006.0, 5008.0])
    np.testing.assert_allclose(ds.ivar.values[0], [100.0, 4.0, 0.0, 0.0, 0.0], rtol=1e-6)
    vac = sio.read_table_spectrum(p, air=True)
    assert np.all(vac.wavelength.values - ds.wavelength.values > 1.3)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        sio.read_table_spectrum(tmp_path / "nope.csv")
    with pytest.raises(OptionError, match="columns"):
        sio.read_table_spectrum(p, columns=[0, 1])


def test_rest_frame_reader(shared_spectra):
    path = shared_spectra / "dr16q_wushen2022" / "op-5808-56325-0560.fits"
    ds = sio.read_rest_frame_fits(path)
    assert "redshift" not in ds.coords
    assert ds.attrs["frame"] == "rest"
    assert float(ds.catalog_redshift[0]) == pytest.approx(2.119)
    assert int(ds.plate[0]) == 5808 and int(ds.mjd[0]) == 56325 and int(ds.fiberid[0]) == 560
    with fits.open(path) as h:
        t = h[3].data
        np.testing.assert_allclose(ds.wavelength.values, t["wave_prereduced"])
        np.testing.assert_allclose(ds.flux.values[0], t["flux_prereduced"].astype(np.float32))
        np.testing.assert_allclose(ds.ivar.values[0], (1 / t["err_prereduced"] ** 2).astype(np.float32), rtol=1e-6)
    assert 1150 < ds.wavelength.values[0] < ds.wavelength.values[-1] < 3400
    dr19 = sio.read_rest_frame_fits(shared_spectra / "dr19q_vac" / "op_102359-60089-27021598149616104.fits")
    assert float(dr19.catalog_redshift[0]) == pytest.approx(0.2584, abs=1e-4)
    assert "redshift" not in dr19.coords
