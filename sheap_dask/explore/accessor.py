"""``ds.sheap``: explore a fit result — model curves, residuals, plots and derived physics.

Importing :mod:`sheap_dask` registers the accessor on every ``xarray.Dataset``. A fit result
(see "The result Dataset" in DESIGN.md) knows its model by identity and, optionally, where its
input spectra live::

    fits = sd.fit_dataset(ds, model)
    fits.sheap.use(spectra=ds)                 # link the input spectra (or a zarr path in attrs)
    fits.sheap.plot(spectrum=0)                # data, model, components, residuals
    fits.sheap.fwhm("hbeta_broad")             # DataArray along spectrum, km/s
    fits.sheap.fwhm("hbeta_broad", errors=True)  # Dataset: fwhm_hbeta_broad, fwhm_hbeta_broad_err
    fits.sheap.bh_mass("vp06_hbeta")           # log10 M_BH / M_sun

Finding the model: ``use(model=...)``, else any live model of this process with the identity
stored in the attrs, else a built-in region rebuilt from the attrs (see
:mod:`sheap_dask.explore.link`). Finding the spectra: a ``spectra=`` argument, else
``use(spectra=...)``, else ``xr.open_zarr(attrs["sheap_input"])``.

Every method returns results along the ``spectrum`` dimension, computed chunk by chunk with
``xr.apply_ufunc(..., dask="parallelized")``: on a dask-backed result nothing is computed until
you ask (``.compute()``, ``.values``, ``.to_zarr``). Derived quantities return a DataArray
named ``<quantity>_<line>`` with ``units``; ``errors=True`` returns a Dataset holding it and
its Monte Carlo error ``<name>_err`` (see :mod:`sheap_dask.derived` for the methods).
The accessor keeps what ``use`` links only for this Dataset object: a new object (``isel``,
``sel``, ...) must be linked again, except that :meth:`SheapAccessor.failed` carries it over.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from . import derived as _derived
from . import evaluate as _evaluate
from . import host as _host
from . import plot as _plot
from . import summary as _summary
from .link import Link, register_model, registered_model

__all__ = ["SheapAccessor", "register_model", "registered_model"]


@xr.register_dataset_accessor("sheap")
class SheapAccessor:
    """Exploration methods on a sheap_dask fit result (``fits.sheap``).

    A facade: linking is :mod:`~sheap_dask.explore.link`, model curves
    :mod:`~sheap_dask.explore.evaluate`, derived quantities :mod:`~sheap_dask.explore.derived`,
    plotting :mod:`~sheap_dask.explore.plot`, status tables :mod:`~sheap_dask.explore.summary`.
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds
        self._link = Link(ds)

    # ------------------------------------------------------------------------------------
    # linking the model and the spectra
    # ------------------------------------------------------------------------------------
    def use(self, *, model=None, spectra: xr.Dataset | None = None, flux_unit: float | str | None = None) -> SheapAccessor:
        """Link the model and/or the input spectra of this result; returns the accessor.

        Parameters
        ----------
        model : sheap_dask.Model, optional
            The model that was fitted; its parameter names must equal the result's ``param``.
        spectra : xarray.Dataset, optional
            The input spectra (``flux``, ``ivar`` or ``flux_err``, ``wavelength``), with the
            same spectra in the same order (or a superset, matched by the spectrum coordinate).
        flux_unit : float or str, optional
            Flux-density unit of the input in erg/s/cm²/Å (e.g. ``1e-17``) or a unit string;
            default: the input's ``flux.attrs["units"]``, else 1e-17 (SDSS).
        """
        self._link.use(model=model, spectra=spectra, flux_unit=flux_unit)
        return self

    def get_model(self):
        """The fitted :class:`~sheap_dask.Model` (``use``, the registry, or the region in attrs).

        Raises
        ------
        ModelError
            The model cannot be found; the message says how to link it.
        """
        return self._link.get_model()

    def get_spectra(self, spectra: xr.Dataset | None = None) -> xr.Dataset:
        """The input spectra: ``spectra``, else ``use(spectra=...)``, else ``attrs["sheap_input"]``.

        Raises
        ------
        InputDataError
            No spectra are linked; the message says how to link them.
        """
        return self._link.get_spectra(spectra)

    # ------------------------------------------------------------------------------------
    # derived quantities of lines
    # ------------------------------------------------------------------------------------
    def measure(self, line: str, *, errors: bool = False, continuum: Sequence[str] | None = None, **options) -> xr.Dataset:
        """All profile measurements of a line in one pass: flux, FWHM, sigma, shifts[, EW].

        Parameters
        ----------
        line : str
            Line name (``model.metadata["lines"]``), e.g. ``"hbeta_broad"``.
        errors : bool
            Add ``<name>_err`` Monte Carlo errors (costs ``n_samples`` profile evaluations).
        continuum : list of str, optional
            Continuum components for the EW (default: the model's, without FeII).
        **options
            ``n_samples``, ``seed``, ``velocity_range``, ``n_grid``, ``batch_size``
            (see :func:`sheap_dask.derived.lines.measure_line`).

        Returns
        -------
        xarray.Dataset
            ``flux_<line>``, ``fwhm_<line>``, ``sigma_<line>``, ``shift_<line>`` (peak),
            ``centroid_shift_<line>``, and ``ew_<line>`` when the model has a continuum.
        """
        return _derived.measure(self._link, line, errors, continuum, options)

    def fwhm(self, line: str, *, errors: bool = False, **options):
        """FWHM (km/s) of a line's summed model profile, per spectrum.

        Parameters
        ----------
        line : str
            Line name, e.g. ``"hbeta_broad"`` (a multi-Gaussian broad line is one name).
        errors : bool
            False: a DataArray ``fwhm_<line>``. True: a Dataset with it and ``fwhm_<line>_err``.
        **options
            ``n_samples``, ``seed``, ``velocity_range``, ``n_grid``, ``batch_size``.
        """
        return _derived.line_quantity(self._link, "fwhm", line, errors, options)

    def sigma(self, line: str, *, errors: bool = False, **options):
        """Line dispersion (km/s; second moment, Peterson et al. 2004). As :meth:`fwhm`."""
        return _derived.line_quantity(self._link, "sigma", line, errors, options)

    def flux(self, line: str, *, errors: bool = False, **options):
        """Integrated line flux (input flux-density unit × Å, i.e. observed flux). As :meth:`fwhm`."""
        return _derived.line_quantity(self._link, "flux", line, errors, options)

    def ew(self, line: str, *, errors: bool = False, continuum: Sequence[str] | None = None, **options):
        """Rest-frame equivalent width (Å) against the continuum at the line's rest wavelength.

        ``continuum`` defaults to the model's continuum components without FeII. As :meth:`fwhm`.
        """
        return _derived.ew(self._link, line, errors, continuum, options)

    def shift(self, line: str, *, method: str = "peak", errors: bool = False, **options):
        """Velocity shift (km/s, positive = redshift) of a line relative to its rest wavelength.

        ``method``: ``"peak"`` (default), ``"centroid"`` or ``"median"``. As :meth:`fwhm`.
        """
        return _derived.shift(self._link, line, method, errors, options)

    # ------------------------------------------------------------------------------------
    # luminosities and black-hole masses
    # ------------------------------------------------------------------------------------
    def luminosity(
        self,
        wavelength: float,
        *,
        quantity: str = "lambda_l_lambda",
        log: bool = False,
        errors: bool = False,
        redshift=None,
        flux_unit: float | str | None = None,
        H0: float | None = None,
        Om0: float | None = None,
        continuum: Sequence[str] | None = None,
        **options,
    ):
        """Continuum luminosity at a rest wavelength: ``λL_λ`` (erg/s, default) or ``L_λ``.

        NaN where the fit found no AGN continuum (all its flux parameters at their zero bound).

        Parameters
        ----------
        wavelength : float
            Rest wavelength in Å (5100, 3000, 1350, ...).
        quantity : {"lambda_l_lambda", "l_lambda"}
            ``λL_λ`` in erg/s or ``L_λ`` in erg/s/Å.
        log : bool
            Return log10 of the luminosity (its error in dex).
        errors : bool
            Return a Dataset with the ``_err`` companion.
        redshift : float or array, optional
            Default: the result's ``redshift`` coordinate.
        flux_unit : float or str, optional
            Input flux unit (erg/s/cm²/Å); default from the input's ``flux.attrs["units"]``,
            else 1e-17.
        H0, Om0 : float, optional
            Flat ΛCDM cosmology (default 70, 0.3).
        continuum : list of str, optional
            Continuum components (default: the model's, without FeII).
        """
        scale = _derived.Scale(redshift, flux_unit, H0, Om0)
        return _derived.luminosity(self._link, wavelength, quantity, log, errors, continuum, scale, options)

    def line_luminosity(
        self,
        line: str,
        *,
        log: bool = False,
        errors: bool = False,
        redshift=None,
        flux_unit: float | str | None = None,
        H0: float | None = None,
        Om0: float | None = None,
        **options,
    ):
        """Line luminosity ``4π d_L² × flux`` (erg/s) of a line's summed profile. As :meth:`luminosity`."""
        return _derived.line_luminosity(self._link, line, log, errors, _derived.Scale(redshift, flux_unit, H0, Om0), options)

    def bh_mass(
        self,
        recipe: str,
        *,
        errors: bool = False,
        redshift=None,
        flux_unit: float | str | None = None,
        H0: float | None = None,
        Om0: float | None = None,
        continuum: Sequence[str] | None = None,
        **options,
    ):
        """Single-epoch virial black-hole mass ``log10(M_BH / M_sun)`` per spectrum.

        ``recipe``: ``"vp06_hbeta"``, ``"vp06_hbeta_line"``, ``"vp06_civ"``, ``"vo09_mgii"``,
        ``"shen11_mgii"`` or ``"gh05_halpha"`` (formulae and references in
        :func:`sheap_dask.derived.bh_mass.bh_mass`). Errors (``errors=True``) are measurement
        errors only, without the recipe's intrinsic scatter (in the ``scatter_dex`` attr).
        Other arguments as :meth:`luminosity`.
        """
        scale = _derived.Scale(redshift, flux_unit, H0, Om0)
        return _derived.bh_mass(self._link, recipe, errors, continuum, scale, options)

    # ------------------------------------------------------------------------------------
    # host galaxy
    # ------------------------------------------------------------------------------------
    def frac_host(self, wavelength: float, *, errors: bool = False, continuum: Sequence[str] | None = None, **options):
        """Host-galaxy fraction ``H / (H + C)`` of the continuum at a rest wavelength (Å).

        ``H`` is the host starlight, ``C`` the AGN continuum (default: the model's continuum
        without FeII). A DataArray ``frac_host_<wavelength>``; ``errors=True`` adds the Monte
        Carlo error. Needs a model with a host (``region(..., host=True)``); see
        :func:`sheap_dask.derived.host.host_fraction`.
        """
        return _host.host_fraction(self._link, wavelength, errors, continuum, options)

    def frac_host_4200(self, *, errors: bool = False, **options):
        """Host fraction at 4200 Å (:meth:`frac_host`)."""
        return self.frac_host(4200.0, errors=errors, **options)

    def frac_host_5100(self, *, errors: bool = False, **options):
        """Host fraction at 5100 Å (:meth:`frac_host`)."""
        return self.frac_host(5100.0, errors=errors, **options)

    def stellar_dispersion(self, *, errors: bool = False, instrumental_sigma: float | None = None):
        """Stellar velocity dispersion of the host (km/s), ``sigma_star``.

        ``sqrt(sigma_0^2 + host_sigma^2 - sigma_inst^2)``; see
        :func:`sheap_dask.derived.host.stellar_dispersion`.
        """
        return _host.stellar_dispersion(self._link, errors, instrumental_sigma)

    # ------------------------------------------------------------------------------------
    # model curves and residuals
    # ------------------------------------------------------------------------------------
    def model(self, wavelength=None, *, spectra: xr.Dataset | None = None, frame: str | None = None) -> xr.DataArray:
        """The fitted model, (spectrum, wavelength).

        Parameters
        ----------
        wavelength : 1-D array, optional
            Rest-frame grid (Å) shared by all spectra. Default: each spectrum's own input
            grid, moved to the rest frame (``λ / (1 + z)``).
        spectra : xarray.Dataset, optional
            Input spectra (for the default grid), if not linked with :meth:`use`.
        frame : {"observed", "rest"}, optional
            Flux scale of the output: ``"observed"`` (``f_obs = f_rest / (1 + z)``, comparable
            pixel by pixel with the input ``flux``; default on the input grid) or ``"rest"``
            (``f_rest``, the fitted quantity; default on an explicit grid).
        """
        return _evaluate.model_curve(self._link, wavelength, spectra=spectra, frame=frame)

    def components(
        self, wavelength=None, *, spectra: xr.Dataset | None = None, frame: str | None = None, names: Sequence[str] | None = None
    ) -> xr.DataArray:
        """Each model component, (spectrum, wavelength, component); arguments as :meth:`model`.

        ``names`` selects components (default: all of ``model.components``).
        """
        return _evaluate.components(self._link, wavelength, spectra=spectra, frame=frame, names=names)

    def residuals(self, spectra: xr.Dataset | None = None) -> xr.DataArray:
        """Normalised residuals ``(flux - model) * sqrt(ivar)``, (spectrum, wavelength).

        NaN where a pixel is masked (``ivar <= 0`` or non-finite, non-finite flux, or a
        ``flux_err`` that is not positive) or outside the model's rest-frame ``window``.
        """
        return _evaluate.residuals(self._link, spectra)

    # ------------------------------------------------------------------------------------
    # plotting
    # ------------------------------------------------------------------------------------
    def plot(self, spectrum: int = 0, *, spectra: xr.Dataset | None = None, ax=None, components: bool = True, legend: str = "outside"):
        """Plot one spectrum: data, total model, continuum, each line, and a residual panel.

        Everything is drawn in the rest frame of the fit (rest wavelength, ``(1+z) f_obs``),
        restricted to the model's window when it has one. Each line of
        ``model.metadata["lines"]`` is drawn as its summed profile on top of the continuum (a
        multi-Gaussian broad line as one curve), in colours distinct from the black total
        model; the title names the object (spec name or J-name, else the spectrum label), z
        and the reduced chi-square; the y axis carries the flux unit.

        Parameters
        ----------
        spectrum : int
            Position of the spectrum along the spectrum dimension (0-based, like ``isel``).
        spectra : xarray.Dataset, optional
            Input spectra, if not linked with :meth:`use`.
        ax : pair of matplotlib Axes, optional
            ``(main, residual)`` axes to draw into; default a new Figure with both panels.
        components : bool
            Also draw the single Gaussians of multi-Gaussian lines (thin, dotted).
        legend : {"outside", "below", "inside", "none"}
            Where the legend goes: right of the axes (default), below the residual panel,
            inside the data panel, or nowhere.

        Returns
        -------
        matplotlib.figure.Figure
        """
        return _plot.plot(self._link, spectrum, spectra=spectra, ax=ax, components=components, legend=legend)

    def plot_object(self, spectrum: int, *, fits=None, spectra: xr.Dataset | None = None, components: bool = True):
        """Catalogue only: one figure with every fitted region of one spectrum side by side.

        Parameters
        ----------
        spectrum : int
            Row of the catalogue (0-based position).
        fits : mapping, optional
            ``{region: fit result}``; default the fit stores of the catalogue store the
            catalogue was opened from (``sd.open_catalog(path)``).
        spectra : xarray.Dataset, optional
            The input spectra; default the store named in ``attrs["sheap_input"]``.
        components : bool
            Also draw the single Gaussians of multi-Gaussian lines.

        Returns
        -------
        matplotlib.figure.Figure
        """
        return _plot.plot_object(self._ds, spectrum, fits=fits, spectra=spectra, components=components)

    def plot_overview(self):
        """Catalogue only: FWHM against continuum luminosity per broad line coloured by the
        fiducial log M_BH, and the fiducial-mass distribution by recipe (a Figure)."""
        return _plot.plot_overview(self._ds)

    # ------------------------------------------------------------------------------------
    # fit status
    # ------------------------------------------------------------------------------------
    def status_names(self, variable: str = "status") -> xr.DataArray:
        """``variable`` (``status``, or a catalogue's ``<region>_status``) decoded to its names
        (``converged``, ``no_data``, ...) from its CF ``flag_values``/``flag_meanings``, as a
        string DataArray along the spectrum dimension (``.to_series().value_counts()`` counts them)."""
        return _summary.status_names(self._ds, variable)

    def status_counts(self):
        """Number of spectra per status (pandas Series indexed by status name, every status listed)."""
        return _summary.status_counts(self._ds)

    def summary(self):
        """Status table: count, fraction, median reduced chi-square and meaning per status (DataFrame)."""
        return _summary.summary(self._ds)

    def ok(self) -> xr.DataArray:
        """Boolean mask along spectrum: status is converged or converged after fallback."""
        return _summary.ok(self._ds)

    def failed(self) -> xr.Dataset:
        """The spectra whose status is not ok (not converged), with model and spectra links kept."""
        bad = np.flatnonzero(~np.asarray(self.ok().values))
        link = self._link.isel(bad)
        link.ds.sheap._link = link  # the subset's accessor starts from this result's links
        return link.ds

    # ------------------------------------------------------------------------------------
    # catalogue exports (sheap_dask.io.export)
    # ------------------------------------------------------------------------------------
    def to_fits(self, path, *, overwrite: bool = False) -> str:
        """Write this catalogue as a FITS table with units and flag meanings: :func:`sheap_dask.io.export.to_fits`."""
        from ..io.export import to_fits

        return to_fits(self._ds, path, overwrite=overwrite)

    def to_parquet(self, path, *, overwrite: bool = False) -> str:
        """Write this catalogue as parquet with units and flag meanings: :func:`sheap_dask.io.export.to_parquet`."""
        from ..io.export import to_parquet

        return to_parquet(self._ds, path, overwrite=overwrite)

    def to_csv(self, path, *, overwrite: bool = False) -> str:
        """Write this catalogue as ECSV (CSV with a units header): :func:`sheap_dask.io.export.to_csv`."""
        from ..io.export import to_csv

        return to_csv(self._ds, path, overwrite=overwrite)
