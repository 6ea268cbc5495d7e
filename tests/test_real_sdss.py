"""Validation on real SDSS/BOSS/eBOSS spectra (``../shared/data/spectra``).

The spec files are ingested once into a zarr store, then every region they cover is fitted
through ``fit_dataset`` on one LocalCluster (one single-threaded worker process, so each
region compiles once). The assertions are real-world sanity checks from issue 4: every
quasar fit converges, reduced chi-square < 3, broad H-beta FWHM 1000-15000 km/s, the [OIII]
5007/4959 flux ratio equals the tie, and the [OIII] 5007 flux of the variable quasar RM017
(z = 0.456, 2014-2020 BOSS epochs, same 2-arcsec fibres) agrees within 20% while its broad
H-beta varies.

Quasars are the spectra the SDSS pipeline classifies as ``QSO``; the three ``GALAXY``
spectra (spec-0266-51602-0013/-0107 without AGN lines, spec-0295-51585-0596 a narrow-line
object) are fitted in the same chunks and only checked to give a valid result.
"""

from __future__ import annotations

import json
import re

import dask
import numpy as np
import pytest
import xarray as xr

import sheap_dask as sd
from sheap_dask.quality import Quality
from sheap_dask.status import Status

pytestmark = pytest.mark.slow

OK = (int(Status.CONVERGED), int(Status.CONVERGED_AFTER_FALLBACK))
RM017_BOSS_PLATES = (6717, 7338, 7339)  # 2-arcsec BOSS fibres; plate 1325 is the 2003 SDSS-I epoch (3 arcsec)


def spec_files(root):
    """The SDSS spec files of the shared folder (not the rest-frame ``op*`` catalogue products)."""
    return sorted(p for p in root.rglob("*.fits") if not p.name.startswith("op"))


def text(values) -> np.ndarray:
    """Plain ``str`` array (zarr v3 round-trips strings as numpy's StringDType)."""
    return np.array([str(v) for v in np.asarray(values).ravel()])


@pytest.fixture(scope="module")
def spectra(shared_spectra, tmp_path_factory) -> xr.Dataset:
    files = spec_files(shared_spectra)
    store = tmp_path_factory.mktemp("real") / "sdss.zarr"
    sd.io.ingest_sdss(files, str(store), chunk=8)
    return sd.io.open_spectra(str(store)).load()


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


def fit_region(spectra, client, name, **kwargs):
    model = sd.models.region(name, **kwargs)
    idx = sd.models.covering_spectra(spectra, model)  # the coverage rule of the fit itself
    sub = spectra.isel(spectrum=idx)
    # one chunk per region: one compilation on the worker
    fits = sd.fit_dataset(sub.chunk({"spectrum": len(idx)}), model, client=client, progress=False).compute()
    fits.sheap.use(spectra=sub)
    return fits


def is_qso(fits) -> np.ndarray:
    return text(fits.objclass.values) == "QSO"


@pytest.fixture(scope="module")
def hbeta(spectra, client):
    # oiii_wing: several of these quasars have blueshifted [OIII] outflow wings
    return fit_region(spectra, client, "hbeta", oiii_wing=True)


@pytest.fixture(scope="module")
def halpha(spectra, client):
    return fit_region(spectra, client, "halpha")


@pytest.fixture(scope="module")
def mgii(spectra, client):
    return fit_region(spectra, client, "mgii")


def test_ingested(spectra):
    assert spectra.sizes["spectrum"] == 19
    assert set(text(spectra.objclass.values)) == {"QSO", "GALAXY"}
    rm = spectra.where(np.abs(spectra.redshift - 0.456) < 0.002, drop=True)
    assert rm.sizes["spectrum"] == 10
    # one shared log-lambda grid: 1e-4 dex pixels
    np.testing.assert_allclose(np.diff(np.log10(spectra.wavelength.values)), 1e-4, atol=1e-9)


def test_hbeta_quasars(hbeta, spectra):
    names = set(text(hbeta.specname.values))
    rm017 = set(text(spectra.specname.values[np.abs(spectra.redshift.values - 0.456) < 0.002]))
    assert rm017 <= names, "all 10 RM017 epochs cover H-beta"
    q = hbeta.isel(spectrum=np.flatnonzero(is_qso(hbeta)))
    assert q.sizes["spectrum"] >= 15
    label = text(q.specname.values)
    status = q.status.values
    assert np.isin(status, OK).all(), dict(zip(label, status))
    assert (q.redchi2.values < 3.0).all(), dict(zip(label, q.redchi2.values.round(2)))
    fwhm = q.sheap.fwhm("hbeta_broad").values
    detected = q.line_detected.sel(line="hbeta_broad").values
    # an undetected broad line has no width (NaN) and says so in its quality bit; that is
    # allowed only under strong starlight (issue 14): a host fraction at 5100 A of at least
    # 0.6, where the continuum's uncertainty (propagated into the line's error) can hide a
    # weak broad line (spec-0280, and RM017 in two epochs)
    f_host = q.sheap.frac_host_5100().values
    assert (f_host[~detected] >= 0.6).all(), dict(zip(label[~detected], f_host[~detected].round(2)))
    assert np.all(q.quality.values[~detected] & Quality.BROAD_LINE_UNDETECTED)
    assert np.isnan(fwhm[~detected]).all()
    assert ((fwhm[detected] > 1000.0) & (fwhm[detected] < 15000.0)).all(), dict(zip(label, fwhm.round(0)))
    # [OIII] 5007/4959 is the tie (Storey & Zeippen 2000), core + wing, to float precision
    ratio = q.sheap.flux("oiii5007").values / q.sheap.flux("oiii4959").values
    np.testing.assert_allclose(ratio, 2.98, rtol=1e-6)  # measured on a 2001-point grid
    p = q.params.sel
    # ties are applied in the solve's dtype (fit.dtype: float32 or float64)
    eps = np.finfo(json.loads(q.attrs["sheap_options"])["dtype"]).eps
    np.testing.assert_allclose(p(param="oiii5007_flux") / p(param="oiii4959_flux"), 2.98, rtol=4 * eps)
    np.testing.assert_allclose(p(param="oiii5007_wing_flux") / p(param="oiii4959_wing_flux"), 2.98, rtol=4 * eps)
    # derived physics is finite and plausible for quasars
    lum = q.sheap.luminosity(5100, log=True).values
    mass = q.sheap.bh_mass("vp06_hbeta").values
    assert ((lum > 42.0) & (lum < 47.0)).all(), dict(zip(label, lum.round(2)))
    assert ((mass[detected] > 6.0) & (mass[detected] < 10.5)).all(), dict(zip(label, mass.round(2)))
    assert np.isnan(mass[~detected]).all()


def test_rm017_oiii_constant_broad_hbeta_varies(hbeta):
    rm = hbeta.isel(spectrum=np.flatnonzero(np.abs(hbeta.redshift.values - 0.456) < 0.002))
    boss = np.isin(rm.plate.values, RM017_BOSS_PLATES)
    assert boss.sum() == 9
    oiii = rm.sheap.flux("oiii5007").values
    broad = rm.sheap.flux("hbeta_broad").values
    o, b = oiii[boss], broad[boss]
    # [OIII] comes from a kpc-sized region: constant over 2014-2020 within 20%
    dev = o / np.median(o) - 1.0
    assert (np.abs(dev) < 0.20).all(), dict(zip(text(rm.specname.values[boss]), o.round(1)))
    # the broad line reverberates: its flux spread exceeds the [OIII] spread
    assert b.max() / b.min() > o.max() / o.min()
    # the 2003 SDSS-I epoch (3-arcsec fibre, [OIII] peak partly sky-masked) still fits
    sdss1 = ~boss
    assert np.isin(rm.status.values[sdss1], OK).all() and (rm.redchi2.values[sdss1] < 3.0).all()
    assert np.isfinite(oiii[sdss1]).all() and (oiii[sdss1] > 0).all()


def test_galaxies_fit_without_crash(hbeta):
    g = hbeta.isel(spectrum=np.flatnonzero(~is_qso(hbeta)))
    assert set(text(g.specname.values)) == {"spec-0266-51602-0013", "spec-0266-51602-0107", "spec-0295-51585-0596"}
    # the galaxies are fitted (their narrow lines and continuum), not dropped or failed
    assert np.isin(g.status.values, OK).all(), dict(zip(text(g.specname.values), g.status.values))
    assert np.isfinite(g.params.values).all() and np.isfinite(g.redchi2.values).all()


def test_halpha_quasars(halpha):
    q = halpha.isel(spectrum=np.flatnonzero(is_qso(halpha)))
    assert q.sizes["spectrum"] >= 10
    label = text(q.specname.values)
    assert np.isin(q.status.values, OK).all(), dict(zip(label, q.status.values))
    assert (q.redchi2.values < 3.0).all(), dict(zip(label, q.redchi2.values.round(2)))
    fwhm = q.sheap.fwhm("halpha_broad").values
    assert ((fwhm > 1000.0) & (fwhm < 15000.0)).all(), dict(zip(label, fwhm.round(0)))
    f84, f48 = q.sheap.flux("nii6584").values, q.sheap.flux("nii6548").values
    assert (f48 > 0).mean() > 0.8  # [NII] may be fitted at its zero bound in a few spectra
    np.testing.assert_allclose(f84[f48 > 0] / f48[f48 > 0], 3.0, rtol=1e-6)


def test_mgii_quasars(mgii):
    q = mgii.isel(spectrum=np.flatnonzero(is_qso(mgii)))
    # 2700-2950 A needs z > 0.41 on SDSS-I and z > 0.34 on BOSS: the 10 RM017 epochs
    # (spec-0752-52251-0323 at z = 0.38 misses the blue end of the window)
    assert q.sizes["spectrum"] == 10 and np.allclose(q.redshift.values, 0.456, atol=0.002)
    label = text(q.specname.values)
    assert np.isin(q.status.values, OK).all(), dict(zip(label, q.status.values))
    assert (q.redchi2.values < 3.0).all(), dict(zip(label, q.redchi2.values.round(2)))
    fwhm = q.sheap.fwhm("mgii_broad").values
    assert ((fwhm > 1000.0) & (fwhm < 15000.0)).all(), dict(zip(label, fwhm.round(0)))


def test_result_rebuilds_model_and_plots(hbeta):
    import matplotlib

    matplotlib.use("Agg")
    spec = json.loads(hbeta.attrs["sheap_region"])
    assert spec["name"] == "hbeta" and spec["kwargs"]["oiii_wing"] is True
    rebuilt = sd.models.region(spec["name"], **spec["kwargs"])
    assert rebuilt.fingerprint() == hbeta.attrs["sheap_model_fingerprint"]
    fig = hbeta.sheap.plot(spectrum=0)
    assert len(fig.axes) >= 2
    matplotlib.pyplot.close(fig)


# -- model pieces the real spectra needed (no data files) -------------------------------------
@pytest.mark.parametrize("name,kwargs", [("hbeta", {}), ("hbeta", {"oiii_wing": True, "n_broad": 3}), ("halpha", {"share_narrow": False}),
                                         ("mgii", {"balmer": True}), ("civ", {"window": (1460.0, 1690.0)})])
def test_region_spec_rebuilds_the_model(name, kwargs):
    model = sd.models.region(name, **kwargs)
    spec = json.loads(json.dumps(model.metadata["region_spec"]))  # JSON round trip
    assert spec["name"] == name
    rebuilt = sd.models.region(spec["name"], **spec["kwargs"])
    assert rebuilt.fingerprint() == model.fingerprint() and rebuilt.param_names == model.param_names


def test_region_spec_omitted_for_template_arrays(tmp_path):
    wl = np.linspace(4000.0, 6000.0, 2001)
    flux = np.exp(-0.5 * ((wl - 4924.0) / 3.0) ** 2) + np.exp(-0.5 * ((wl - 5018.0) / 3.0) ** 2)
    assert "region_spec" not in sd.models.region("hbeta", feii_template=(wl, flux)).metadata
    path = tmp_path / "feii.txt"
    np.savetxt(path, np.column_stack([wl, flux]))
    model = sd.models.region("hbeta", feii_template=path)
    spec = json.loads(json.dumps(model.metadata["region_spec"]))
    assert spec["kwargs"]["feii_template"] == str(path)
    assert sd.models.region("hbeta", **spec["kwargs"]).fingerprint() == model.fingerprint()


def test_oiii_wing_model():
    model = sd.models.region("hbeta", oiii_wing=True)
    assert model.n_free == sd.models.region("hbeta").n_free + 3  # the wing: flux, fwhm, shift (4959 tied)
    assert model.metadata["lines"]["oiii5007"]["components"] == ["oiii5007", "oiii5007_wing"]
    assert model.params["oiii4959_wing_flux"].tie == ("oiii4959_wing_flux", "oiii5007_wing_flux", "/", 2.98)
    assert model.params["oiii4959_wing_fwhm"].tie[1] == "oiii5007_wing_fwhm"
    with pytest.raises(ValueError, match="oiii_wing"):
        sd.models.region("halpha", oiii_wing=True)
    # the initializer starts the wing blueward of the core, with a positive flux and the tie
    ds = sd.io.synthetic_spectra(8, seed=2)
    init = model.initial_values(ds.wavelength.values, ds.flux.values, ds.ivar.values)
    i = model.params.index
    ok = ~ds.all_nan.values
    assert (init[ok, i("oiii5007_wing_flux")] > 0).all()
    assert (init[ok, i("oiii5007_wing_shift")] < init[ok, i("oiii5007_shift")]).all()
    np.testing.assert_allclose(init[:, i("oiii5007_wing_flux")], 2.98 * init[:, i("oiii4959_wing_flux")], rtol=1e-12)


def test_committed_table_matches_a_fresh_fit(spectra, hbeta, halpha, mgii):
    """The README's and docs/'s real-spectra table (``examples/real_sdss.py --update-docs``)
    is what the code produces now: every value within 2% or half its error of the committed
    one, the same detections and statuses. Regenerate the table when a change moves it."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("real_sdss_example", repo / "examples" / "real_sdss.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = {}
    for name, fits in (("hbeta", hbeta), ("halpha", halpha), ("mgii", mgii)):
        model = sd.models.region(name, **example.REGIONS[name][0])
        results[name] = (fits, sd.models.covering_spectra(spectra, model))
    fresh = example.parse_table(example.markdown_table(example.table_rows(spectra, results)))
    committed_text = (repo / "docs" / "real_sdss_table.md").read_text()
    assert committed_text in (repo / "README.md").read_text(), "README's table differs from docs/real_sdss_table.md"
    committed = example.parse_table(committed_text.split("\n\nOther formats")[0])
    assert [r["spectrum"] for r in fresh] == [r["spectrum"] for r in committed]
    # spec-1599's H-alpha with the host has two minima about one error apart; the numerical
    # path (CPU, jax release) decides which one a run ends in (README, "Real spectra"): there
    # the two agree within their joint error
    two_minima = {("1599-53089-0469", "fwhm_halpha")}
    drift = []
    for new, old in zip(fresh, committed):
        for key in example.COLUMNS:
            a, b, err = new[key], old[key], old[key + "_err"]
            tol = max(0.02 * abs(b), 0.5 * err if np.isfinite(err) else 0.0, 10.0 ** -example.COLUMNS[key])
            if (new["spectrum"], key) in two_minima:
                tol = max(tol, float(np.hypot(err, new[key + "_err"])))
            same_nan = np.isnan(a) == np.isnan(b)
            if not same_nan or (np.isfinite(b) and abs(a - b) > tol) or new[f"detected_{key}"] != old[f"detected_{key}"]:
                drift.append((new["spectrum"], key, b, a))
        if new["status"] != old["status"]:
            drift.append((new["spectrum"], "status", old["status"], new["status"]))
    assert not drift, f"committed table drifted (spectrum, column, committed, now): {drift}"


def test_broad_widths_stable_under_perturbed_starts(spectra, client, hbeta):
    """Detected broad H-beta widths under other starts of the broad components (widths x0.6-1.6,
    shifts +-300 km/s, fluxes x0.5-2; five draws, the last also with a 10x tighter convergence
    tolerance): at least 75% of the quasars keep their width within its error in every draw,
    and no draw that moves a width by more than twice its error finds a clearly better solution
    there (objective lower by more than 4, i.e. more than 2 sigma for one parameter) than the
    default start (README, "What the numbers say", quotes how many keep their width)."""
    model = sd.models.region("hbeta", oiii_wing=True)
    idx = sd.models.covering_spectra(spectra, model)
    sub = spectra.isel(spectrum=idx).chunk({"spectrum": idx.size})
    q = is_qso(hbeta) & hbeta.line_detected.sel(line="hbeta_broad").values
    ref = hbeta.sheap.fwhm("hbeta_broad", errors=True)
    ref_fwhm, ref_err = ref["fwhm_hbeta_broad"].values, ref["fwhm_hbeta_broad_err"].values
    broad = [p for p in model.params.free_names if p.startswith("hbeta_broad")]
    lower, upper = model.params.lower, model.params.upper
    rng = np.random.default_rng(11)
    widths, objectives = [], []
    for trial in range(5):
        init = {}
        for p in broad:
            i = model.params.index(p)
            value = hbeta.params.sel(param=p).values
            if p.endswith("_fwhm"):
                value = value * rng.uniform(0.6, 1.6, value.size)
            elif p.endswith("_shift"):
                value = value + rng.uniform(-300.0, 300.0, value.size)
            else:
                value = value * rng.uniform(0.5, 2.0, value.size)
            span = upper[i] - lower[i]
            value = np.clip(value, lower[i] + 0.02 * span, upper[i] - 0.02 * span)
            init[p] = xr.DataArray(value, dims="spectrum")
        tolerance = {"sheap_dask.convergence.rtol": 0.1 * dask.config.get("sheap_dask.convergence.rtol")} if trial == 4 else {}
        with dask.config.set(tolerance):
            fits = sd.fit_dataset(sub, model, client=client, progress=False, init=init).compute()
        fits.sheap.use(spectra=spectra.isel(spectrum=idx))
        widths.append(fits.sheap.fwhm("hbeta_broad").values)
        objectives.append(fits.loss.values)
    widths, objectives = np.array(widths), np.array(objectives)
    off = np.abs(widths - ref_fwhm[None]) > np.maximum(ref_err[None], 0.02 * ref_fwhm[None])
    label = text(hbeta.specname.values)
    moved = {label[i]: widths[:, i].round(0).tolist() for i in np.flatnonzero(q & off.any(0))}
    assert len(moved) <= 0.25 * q.sum(), f"broad H-beta FWHM moved beyond its error (reference {dict(zip(label, ref_fwhm.round(0)))}): {moved}"
    # the README quotes these counts ("What the numbers say")
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = re.search(r"(\d+) of the (\d+) detected widths stay within their errors", readme)
    assert quoted and (int(quoted[1]), int(quoted[2])) == (int(q.sum()) - len(moved), int(q.sum())), (quoted and quoted[0], len(moved), q.sum())
    # a draw that moved the width by more than twice its error must not have found a clearly
    # better fit there; within 2 sigma it is the same solution, even where the tighter
    # tolerance finds it lower
    far = np.abs(widths - ref_fwhm[None]) > np.maximum(2.0 * ref_err[None], 0.02 * ref_fwhm[None])
    better = far & ((hbeta.loss.values[None] - objectives) > 4.0) & q[None]
    assert not better.any(), {label[i]: (objectives[:, i] - hbeta.loss.values[i]).round(1).tolist() for i in np.flatnonzero(better.any(0))}
