"""The README's issue-15 performance figures are what the benchmark scripts recorded.

``benchmarks/results/models.jsonl`` (``bench_models.py``) and ``profile_models.jsonl``
(``profile_models.py``) hold the JSON lines as printed; ``benchmarks/models_table.py``
renders them into README.md. Re-run and re-render: ``python benchmarks/models_table.py --run``.
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
