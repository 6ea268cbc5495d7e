"""Derived physics from fitted parameters, each with a propagated error.

One module per concern; each function is vectorised over spectra and returns
``(value, error)`` float64 arrays (see each module's docstring for its conventions):

- :mod:`~sheap_dask.derived.lines`: flux, FWHM, sigma, shifts and EW of a line's summed profile;
- :mod:`~sheap_dask.derived.luminosity`: flat ΛCDM cosmology, continuum and line luminosities;
- :mod:`~sheap_dask.derived.bh_mass`: single-epoch virial black-hole mass recipes;
- :mod:`~sheap_dask.derived.errors`: the Monte Carlo error engine they share.

``sheap_dask.models.derived`` gathers the public functions in one namespace
(``derived.fwhm(...)``, ``derived.bh_mass(...)``); ``ds.sheap`` wraps them as DataArrays.
Nothing here imports the Dataset layer.
"""
