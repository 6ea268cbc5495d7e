"""Exploring fit results: the ``ds.sheap`` accessor and the modules it delegates to.

``accessor`` (the facade registered as ``ds.sheap``), ``link`` (a result's model and
spectra), ``evaluate`` (model curves, components, residuals), ``derived`` (derived quantities
as DataArrays), ``plot`` (one spectrum with matplotlib), ``summary`` (fit-status tables).
The top of the Dataset layer: nothing else in the package imports it.
"""
