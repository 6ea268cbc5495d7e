"""The README's issue-15 performance figures are what the benchmark scripts recorded.

``benchmarks/results/models.jsonl`` (``bench_models.py``) and ``profile_models.jsonl``
(``profile_models.py``) hold the JSON lines as printed; ``benchmarks/models_table.py``
renders them into README.md. Re-run and re-render: ``python benchmarks/models_table.py --run``.
Also the continuum-bias paragraph (``bench_continuum.py``) and the host benchmark's statistics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import models_table


def test_readme_models_table_is_the_recorded_benchmark():
    readme = models_table.README.read_text()
    table = models_table.render(models_table.load(), models_table.load_profile())
    assert models_table.readme_with_table(readme, table) == readme, (
        "README.md's performance table is not what benchmarks/results/*.jsonl hold: "
        "run `python benchmarks/models_table.py --write-readme` (or --run to measure again)")


def test_recorded_runs_are_the_issue_15_setup():
    records = models_table.load()
    assert [(r["model"], r["data"]) for r in records][: len(models_table.RUNS)] == models_table.RUNS
    for r in records:
        assert (r["n_spectra"], r["chunk"], r["workers"]) == (2000, 250, 2), r
        assert r["empty_compilation_cache"] is True
        assert r["sheap"]["recompiling_chunks_warm"] == 0
        # the ratios are of rates measured in the same invocation
        assert r["speedup_warm"] == pytest.approx(r["sheap"]["spectra_per_s_warm"] / r["curvefit"]["spectra_per_s"], abs=0.051)
        assert r["speedup_cold"] == pytest.approx(r["sheap"]["spectra_per_s_cold"] / r["curvefit"]["spectra_per_s"], abs=0.051)


def test_table_marks_unmet_targets():
    records = json.loads(json.dumps(models_table.load()))
    records[0]["speedup_warm"] = 3.0
    text = models_table.render(records, models_table.load_profile())
    assert "warm 3.0x curvefit (target 10x): **unmet**, 3.3x short" in text
    records[0]["speedup_warm"] = 12.0
    assert "warm 12.0x curvefit (target 10x): met" in models_table.render(records, models_table.load_profile())


def test_readme_continuum_bias_is_the_recorded_benchmark():
    """The README's staged-continuum figures are what ``bench_continuum.py --record`` wrote,
    and the last line measured the windows the H-beta region uses now."""
    import bench_continuum

    import sheap_dask as sd

    records = bench_continuum.load()
    readme = bench_continuum.README.read_text()
    assert bench_continuum.readme_with_paragraph(readme) == readme, "run `python benchmarks/bench_continuum.py --write-readme`"
    model = sd.models.region("hbeta", host=False)
    assert records[-1]["windows"] == [list(w) for w in model.continuum_stage.windows]
    assert records[-1]["heii_fwhm_max"] == model.params["heii4686_fwhm"].max


def test_host_benchmark_calibration_and_fraction():
    """bench_host's error calibration: honest Gaussian errors give ~68% / ~95% within 1 / 2
    errors and an expected fraction within the tolerance of erf(tol / (sqrt(2) sigma)); errors
    half as large as the scatter are caught; the binomial standard error is sqrt(p(1-p)/n)."""
    import numpy as np

    import bench_host

    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 0.8, 20000)
    sigma = np.full(truth.size, 0.05)
    value = truth + rng.normal(0, 0.05, truth.size)
    honest = bench_host.calibration("f", value, sigma, truth, 0.1)
    assert abs(honest["f_within_1_error"] - 0.683) < 0.01 and abs(honest["f_within_2_errors"] - 0.954) < 0.01
    assert abs(honest["f_expected_from_errors"] - 0.954) < 0.001  # erf(2 / sqrt(2))
    assert abs(np.mean(np.abs(value - truth) <= 0.1) - honest["f_expected_from_errors"]) < 0.01
    sigma[:10] = np.nan  # undefined errors are counted apart, not as misses
    overconfident = bench_host.calibration("f", value, sigma / 2, truth, 0.1)
    assert overconfident["f_errors_defined"] == round(1 - 10 / truth.size, 3)
    assert overconfident["f_within_1_error"] < 0.45
    assert bench_host.fraction(np.array([True] * 90 + [False] * 10)) == (0.9, 0.03)


def test_host_benchmark_keeps_mismatched_hosts_out_of_the_record():
    """A line whose synthetic host is drawn from another template set than the fitted one
    (``--truth-template``) measures something else than the README's figures: it is printed,
    and ``--record`` with it is refused before anything is fitted."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_host.py"
    record = script.parent / "results" / "host.jsonl"
    before = record.read_text()
    done = subprocess.run([sys.executable, str(script), "--truth-template", "mastar", "--record"], capture_output=True, text=True)
    assert done.returncode == 2 and "drop --truth-template to record" in done.stderr
    assert record.read_text() == before
