"""The built-in region models written in plain numpy, for the scipy/curvefit baseline.

``numpy_model(model)`` returns ``f(wavelength, free_params) -> flux`` that evaluates the same
components as the JAX model (Gaussian lines, power law, FeII template) with numpy only, so
the baseline pays no JAX dispatch cost. ``check(model)`` asserts both agree.
"""

from __future__ import annotations

import math

import numpy as np


C_KMS = 299792.458
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _gaussian(x, flux, shift, fwhm, rest):
    centre = rest * (1.0 + shift / C_KMS)
    s = centre * max(fwhm, 1e-3) / C_KMS * _FWHM_TO_SIGMA
    return flux / (math.sqrt(2 * math.pi) * s) * np.exp(-0.5 * ((x - centre) / s) ** 2)


def numpy_model(model):
    """``f(wavelength, free_params) -> flux`` in numpy; ties and fixed values applied."""
    params = model.params
    names = list(params.names)
    embed, _ = params.embedding()
    base = params.expand_free(np.zeros(params.n_free), params.values)
    parts = []
    for comp in model.component_objects.values():
        idx = [names.index(n) for n in comp.param_names]
        if comp.kind == "gaussian":
            parts.append(("gaussian", idx, comp.rest_wavelength))
        elif comp.kind == "powerlaw":
            parts.append(("powerlaw", idx, comp.info["ref_wavelength"]))
        elif comp.kind == "feii":
            parts.append(("feii", idx, comp.info["template_obj"]))
        else:
            raise NotImplementedError(f"numpy baseline has no {comp.kind!r} component")

    def f(wavelength, free):
        p = base + embed @ np.asarray(free, dtype=float)
        total = np.zeros_like(wavelength, dtype=float)
        for kind, idx, extra in parts:
            q = p[idx]
            if kind == "gaussian":
                total += _gaussian(wavelength, q[0], q[1], q[2], extra)
            elif kind == "powerlaw":
                total += q[0] * (wavelength / extra) ** q[1]
            else:
                total += q[0] * extra.evaluate_numpy(wavelength, q[1], q[2])
        return total

    return f


def check(model, wavelength, phys) -> float:
    """Largest relative difference between the numpy and the JAX model at ``phys``."""
    f = numpy_model(model)
    free_idx = [list(model.params.names).index(n) for n in model.params.free_names]
    a = f(wavelength, np.asarray(phys)[free_idx])
    b = np.asarray(model.evaluate(wavelength, phys))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
