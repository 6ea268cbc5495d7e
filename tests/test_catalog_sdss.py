"""The committed catalogue of the SDSS spectra (docs/catalog_table.md, made by
examples/catalog_sdss.py) against a fresh run: one slow test on a LocalCluster."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _example():
    spec = importlib.util.spec_from_file_location("catalog_sdss", REPO / "examples" / "catalog_sdss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]


# Cells whose fit has two minima about one error apart, the numerical path (CPU, jax release,
# chunk) deciding which one a run ends in: spec-1599's H-alpha with the host (README, "Real
# spectra"). There a fresh value agrees with the committed one within their joint error.
TWO_MINIMA = {("spec-1599-53089-0469", "FWHM Hα [km/s]")}
# Flags that compare such a cell with another (H-beta against H-alpha): in that row they follow
# whichever minimum the run ended in.
WIDTH_FLAGS = {"broad_width_mismatch"}


def _without(cell: str, flags: set) -> str:
    return ", ".join(f for f in cell.split(", ") if f not in flags and f != "–") or "–"


def assert_tables_agree(fresh: str, committed: str, two_minima=frozenset()) -> None:
    """Same rows, same words; each number within 2 units of its last printed digit, or a value
    given with an error within half that error (as tests/test_real_sdss.py), the error
    within 25% of itself. Float round-off between runs moves a rounded digit; XLA's
    code for another CPU (AVX-512 or AVX2 vector widths sum in another order) moves the weak
    broad lines of host-dominated spectra by up to ~0.4 of their error and their errors by
    ~20% (spec-0332's H-beta 8725 +- 917 on one, 8384 +- 716 on another); a real change
    moves more. A cell in ``two_minima`` ((row, column header) pairs) agrees within the joint
    error of the two."""
    a, b = _cells(fresh), _cells(committed)
    header = next((row for row in b if row and row[0] == "spectrum"), [])
    two_minima_rows = {row for row, _ in two_minima}
    assert len(a) == len(b), f"{len(a)} rows now, {len(b)} committed"
    for row_a, row_b in zip(a, b):
        assert len(row_a) == len(row_b), row_b[0]
        for column, (x, y) in enumerate(zip(row_a, row_b)):
            name = header[column] if column < len(header) else None
            if row_b[0] in two_minima_rows and name == "flags":
                x, y = _without(x, WIDTH_FLAGS), _without(y, WIDTH_FLAGS)
            assert NUMBER.sub("#", x) == NUMBER.sub("#", y), (row_b[0], x, y)
            numbers = list(zip(NUMBER.findall(x), NUMBER.findall(y)))
            error = float(numbers[1][1]) if len(numbers) == 2 and " ± " in y else None
            if error is not None and (row_b[0], name) in two_minima:
                joint = np.hypot(float(numbers[1][0]), error)
                assert abs(float(numbers[0][0]) - float(numbers[0][1])) <= joint, (row_b[0], x, y)
                continue
            for k, (u, v) in enumerate(numbers):
                digits = len(v.split(".")[1]) if "." in v else 0
                allowed = 2 * 10.0**-digits
                if error is not None:
                    allowed = max(allowed, 0.5 * error if k == 0 else 0.25 * error)
                assert abs(float(u) - float(v)) <= allowed, (row_b[0], x, y)


def test_assert_tables_agree_catches_a_change():
    base = "| spec-1 | 0.4560 | hbeta | 2684 ± 106 | 7.98 ± 0.04 |"
    assert_tables_agree(base, base)
    assert_tables_agree(base.replace("7.98", "7.99"), base)  # one rounded digit
    assert_tables_agree(base.replace("2684 ± 106", "2737 ± 130"), base)  # half its error; the error by 23%
    for changed in (base.replace("7.98", "8.03"), base.replace("hbeta", "mgii"), base.replace("2684", "–"),
                    base.replace("2684", "2740"), base.replace("± 106", "± 134"), base.replace("0.4560", "0.4570")):
        with pytest.raises(AssertionError):
            assert_tables_agree(changed, base)
    # a cell with two minima: within the joint error, not beyond
    table = "| spectrum | FWHM Hα [km/s] |\n|---|---|\n| spec-1 | 9952 ± 280 |"
    cell = {("spec-1", "FWHM Hα [km/s]")}
    assert_tables_agree(table.replace("9952 ± 280", "9683 ± 195"), table, cell)
    with pytest.raises(AssertionError):
        assert_tables_agree(table.replace("9952 ± 280", "9683 ± 195"), table)
    with pytest.raises(AssertionError):
        assert_tables_agree(table.replace("9952 ± 280", "9552 ± 195"), table, cell)
    # ... and in that row only, the flag comparing it with H-beta may follow it
    flagged = "| spectrum | FWHM Hα [km/s] | flags |\n|---|---|---|\n| spec-1 | 9952 ± 280 | – |\n| spec-2 | 3000 ± 100 | – |"
    moved = flagged.replace("9952 ± 280 | –", "9683 ± 195 | broad_width_mismatch")
    assert_tables_agree(moved, flagged, cell)
    for changed in (moved.replace("broad_width_mismatch", "fiducial_unavailable"),
                    flagged.replace("3000 ± 100 | –", "3000 ± 100 | broad_width_mismatch")):
        with pytest.raises(AssertionError):
            assert_tables_agree(changed, flagged, cell)


@pytest.mark.slow
@pytest.mark.cluster
def test_committed_catalog_table_matches_a_fresh_run(shared_spectra, tmp_path):
    from distributed import Client

    import sheap_dask as sd

    example = _example()
    # one worker: each region's program is compiled once, not once per worker (the suite runs
    # beside this test on the other core); the chunks' results do not depend on the workers
    with sd.start_local_cluster(1, 1, dashboard_address=":0") as cluster, Client(cluster) as client:
        cat = example.make_catalog(shared_spectra, tmp_path, client)
    assert cat.sizes["spectrum"] == len(example.spec_files(shared_spectra)) == 19
    fresh = example.table_markdown(cat)
    committed = (REPO / "docs" / "catalog_table.md").read_text(encoding="utf-8")
    assert_tables_agree(fresh, committed, TWO_MINIMA)
    # the header line (counts of regions and fiducial masses) is regenerated too
    assert NUMBER.findall(fresh.splitlines()[2])[:6] == NUMBER.findall(committed.splitlines()[2])[:6]
    # a fiducial mass for every detected broad line: 14 of the 16 quasars (RM017 in two
    # host-dominated epochs has no broad H-beta above 3 sigma once the continuum's uncertainty
    # is in its error; spec-0280's sits at the threshold, so 13 is allowed)
    assert np.isfinite(cat["log_mbh"].values).sum() >= 13
