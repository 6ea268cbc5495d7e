"""The catalogue's columns from a region's fits (sheap_dask.catalog_table), on a hand-made fit
result of the toy model: masking by status and detection, flags, units, the fiducial mass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from derived_toy import MODEL, NAMES, dl_cm, make_params

from sheap_dask import catalog_table as ct
from sheap_dask.derived import catalog as dc
from sheap_dask.quality import quality_attrs
from sheap_dask.status import Status, status_attrs

LINES = list(MODEL.metadata["lines"])
Z = np.array([0.3, 0.5, 0.7, 1.2, 2.2])


def fake_fits(n=5, status=(0, 1, 2, 5, 0), undetected=(("hbeta_broad", 1),)):
    """A fit result of the toy model as fit_dataset makes it (no fitting)."""
    params = make_params(n, hb1_fwhm=np.linspace(2500, 5000, n), ha_fwhm=np.linspace(2000, 4000, n), mg_fwhm=3500.0)
    err = np.abs(params) * 0.02 + 1.0
    cov = np.zeros((n, len(NAMES), len(NAMES)))
    for i in range(n):
        cov[i] = np.diag(err[i] ** 2)
    for t, s, _, _ in MODEL.params.ties:  # tied parameters: no covariance of their own
        cov[:, NAMES.index(t), :] = 0.0
        cov[:, :, NAMES.index(t)] = 0.0
    detected = np.ones((n, len(LINES)), dtype=bool)
    for line, row in undetected:
        detected[row, LINES.index(line)] = False
    at_bound = np.zeros((n, len(NAMES)), dtype=bool)
    at_bound[4, NAMES.index("oiii_fwhm")] = True
    ds = xr.Dataset(
        {
            "params": (("spectrum", "param"), params),
            "params_err": (("spectrum", "param"), err),
            "params_cov": (("spectrum", "param", "param2"), cov),
            "status": ("spectrum", np.array(status, dtype=np.int8), status_attrs()),
            "quality": ("spectrum", np.zeros(n, dtype=np.int32), quality_attrs()),
            "redchi2": ("spectrum", np.linspace(0.9, 1.3, n)),
            "n_iter": ("spectrum", np.full(n, 12, dtype=np.int32)),
            "method": ("spectrum", np.array(["lm"] * n)),
            "n_masked": ("spectrum", np.zeros(n, dtype=np.int32)),
            "at_bound": (("spectrum", "param"), at_bound),
            "line_detected": (("spectrum", "line"), detected),
        },
        coords={"spectrum": np.arange(10, 10 + n), "param": NAMES, "param2": NAMES, "line": LINES, "redshift": ("spectrum", Z[:n])},
    )
    return ds


@pytest.fixture(scope="module")
def table():
    fits = fake_fits()
    index = xr.DataArray(np.arange(10, 15, dtype=np.uint32), dims=("spectrum",))
    return ct.region_table(fits, MODEL, "toy", dc.region_plan(MODEL), flux_unit=1e-17, H0=70.0, Om0=0.3, index=index,
                           n_samples=64, seed=0).compute()


def test_measured_detected_lines_and_their_luminosity(table):
    hb = make_params(5, hb1_fwhm=np.linspace(2500, 5000, 5))
    assert np.isfinite(table["hbeta_broad_fwhm"].values[[0, 2, 4]]).all()
    lum = 4 * np.pi * dl_cm(Z[0]) ** 2 * 1e-17 * table["hbeta_broad_flux"].values[0]
    np.testing.assert_allclose(table["hbeta_broad_log_lum"].values[0], np.log10(lum), rtol=1e-10)
    flux, err = table["hbeta_broad_flux"].values[0], table["hbeta_broad_flux_err"].values[0]
    want = 0.5 * (np.log10(flux + err) - np.log10(flux - err))  # half the log width of flux +- error
    np.testing.assert_allclose(table["hbeta_broad_log_lum_err"].values[0], want, rtol=1e-10)
    assert table["hbeta_broad_detected"].dtype == bool and hb.shape == (5, len(NAMES))


def test_an_undetected_line_keeps_its_flux_and_gets_an_upper_limit(table):
    i = 1  # hbeta_broad undetected there
    for q in ("peak", "fwhm", "sigma", "shift", "ew"):
        assert np.isnan(table[f"hbeta_broad_{q}"].values[i]) and np.isnan(table[f"hbeta_broad_{q}_err"].values[i])
    flux, err = table["hbeta_broad_flux"].values[i], table["hbeta_broad_flux_err"].values[i]
    assert np.isfinite(flux) and np.isfinite(err)
    lum = 4 * np.pi * dl_cm(Z[i]) ** 2 * 1e-17
    np.testing.assert_allclose(table["hbeta_broad_log_lum"].values[i], np.log10(lum * (max(flux, 0) + 3 * err)), rtol=1e-10)
    assert np.isnan(table["hbeta_broad_log_lum_err"].values[i])
    assert table["hbeta_broad_flags"].values[i] & ct.LineFlag.NOT_DETECTED
    # masses with that line are NaN there; others are not
    assert np.isnan(table["log_mbh_vp06_hbeta"].values[i]) and np.isfinite(table["log_mbh_vo09_mgii"].values[i])


def test_status_decides_what_is_measured(table):
    # max_iter (row 2): values kept, flagged; failed (row 3): everything NaN, flagged not measured
    assert np.isfinite(table["hbeta_broad_fwhm"].values[2]) and table["hbeta_broad_flags"].values[2] & ct.LineFlag.FIT_NOT_CONVERGED
    for name, var in table.data_vars.items():
        if var.dtype.kind == "f" and not name.endswith("chi2_nu"):
            assert np.isnan(var.values[3]), name
    assert (table["hbeta_broad_flags"].values[3] & ct.LineFlag.NOT_MEASURED) and not table["hbeta_broad_detected"].values[3]
    assert table["oiii5007_flags"].values[4] & ct.LineFlag.PARAM_AT_BOUND  # oiii_fwhm at its bound
    assert not table["hbeta_broad_flags"].values[4] & ct.LineFlag.PARAM_AT_BOUND
    assert table["toy_status"].dtype == np.int8 and list(table["toy_status"].values) == [0, 1, 2, 5, 0]


def test_every_column_has_units_and_a_description(table):
    for name, var in table.data_vars.items():
        assert var.attrs.get("long_name"), name
        if var.dtype.kind in "fiub":
            assert "units" in var.attrs, name
    assert table["hbeta_broad_flux"].attrs["units"] == "1e-17 erg/s/cm2"
    assert table["hbeta_broad_fwhm"].attrs["units"] == "km/s" and table["log_l5100"].attrs["units"] == "log10(erg/s)"
    assert table["log_mbh_vp06_hbeta"].attrs["units"] == "log10(M/M_sun)"
    flags = table["hbeta_broad_flags"].attrs
    assert flags["flag_meanings"].split() == [f.name.lower() for f in ct.LineFlag] and list(flags["flag_masks"]) == [1, 2, 4, 8, 16]
    assert "flag_values" not in flags  # the status' attrs do not leak into other columns
    assert table["toy_status"].attrs["flag_meanings"].split()[0] == "converged"


def _assembled(table, z, fiducial="dr16q", width_sigma=3.0):
    n = 7
    positions = np.array([0, 2, 3, 4, 6])
    coords = {"redshift": xr.Variable(("spectrum",), z), "specname": xr.Variable(("spectrum",), np.array([f"s{i}" for i in range(n)]))}
    return ct.assemble({"toy": (positions, table.drop_vars("spectrum"))}, coords, n, "spectrum", redshift=z, fiducial=fiducial,
                       width_sigma=width_sigma).compute()


def test_assemble_rows_fiducial_mass_and_flags(table):
    z = np.array([0.3, 0.4, 0.5, 1.2, 1.5, 0.1, 2.2])  # rows 0, 2, 3, 4, 6: table rows 0-4 (row 4: a failed fit)
    cat = _assembled(table, z)
    assert cat.sizes["spectrum"] == 7 and list(cat["toy_covered"].values) == [True, False, True, True, True, False, True]
    # not covered: NaN, status no_data, not measured
    assert np.isnan(cat["hbeta_broad_flux"].values[1]) and cat["toy_status"].values[1] == Status.NO_DATA
    assert cat["hbeta_broad_flags"].values[5] == ct.LineFlag.NOT_MEASURED and cat["toy_n_iter"].dtype == np.int32
    assert cat["flags"].values[1] & ct.CatalogFlag.NO_REGION and not cat["flags"].values[0] & ct.CatalogFlag.NO_REGION
    # DR16Q rule: H-beta below z 0.8, MgII to 1.9, CIV above
    assert list(cat["mbh_recipe"].values[[0, 3, 6]]) == ["vp06_hbeta", "shen11_mgii", "vp06_civ"]
    np.testing.assert_allclose(cat["log_mbh"].values[3], cat["log_mbh_shen11_mgii"].values[3])
    assert np.isnan(cat["log_mbh"].values[4]) and cat["flags"].values[4] & ct.CatalogFlag.FIDUCIAL_UNAVAILABLE  # failed fit
    np.testing.assert_allclose(cat["log_mbh"].values[6], cat["log_mbh_vp06_civ"].values[6])
    # row 2 (table row 1): H-beta undetected -> no fiducial mass, flagged
    assert np.isnan(cat["log_mbh"].values[2]) and cat["mbh_recipe"].values[2] == ""
    assert cat["flags"].values[2] & ct.CatalogFlag.FIDUCIAL_UNAVAILABLE
    # the Eddington ratio from the same draws as the mass
    edd = cat["log_lbol"].values[0] - math.log10(1.26e38) - cat["log_mbh"].values[0]
    np.testing.assert_allclose(cat["log_edd_ratio"].values[0], edd, rtol=1e-9)
    assert not [v for v in cat.data_vars if v.startswith("_")]
    assert cat["specname"].values[3] == "s3" and "redshift" in cat.coords


def test_fiducial_choices_and_the_width_flag(table):
    z = np.array([0.3, 0.4, 0.5, 1.2, 1.5, 0.1, 2.2])
    cat = _assembled(table, z, fiducial="vo09_mgii")
    assert set(cat["mbh_recipe"].values[[0, 3, 6]]) == {"vo09_mgii"}
    assert ct.fiducial_rule("mgii") == ((math.inf, "shen11_mgii"),)
    with pytest.raises(ValueError, match="fiducial='nope'"):
        ct.fiducial_rule("nope")
    # H-beta 2500-5000 vs H-alpha 2000-4000 km/s with 2% errors: GH05 predicts H-beta from H-alpha
    hb, ha = cat["hbeta_broad_fwhm"].values, cat["halpha_broad_fwhm"].values
    predicted = 1.07e3 * (ha / 1e3) ** 1.03
    mismatch = (cat["flags"].values & ct.CatalogFlag.BROAD_WIDTH_MISMATCH) > 0
    combined = np.hypot(cat["hbeta_broad_fwhm_err"].values, 1.03 * predicted * cat["halpha_broad_fwhm_err"].values / ha)
    want = np.isfinite(combined) & (np.abs(hb - predicted) > 3 * combined)
    assert list(mismatch) == list(want) and mismatch.any()
    loose = _assembled(table, z, width_sigma=1e6)
    assert not (loose["flags"].values & ct.CatalogFlag.BROAD_WIDTH_MISMATCH).any()
