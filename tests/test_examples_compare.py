"""examples/compare_settings.py end to end with tiny settings."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from pyro_physvae.settings import SETTINGS

EXAMPLE = Path(__file__).parents[1] / "examples" / "compare_settings.py"
TINY = ["--epochs", "2", "--n", "48", "--n-steps", "20", "--batch", "16", "--samples", "8",
        "--iwae-particles", "2", "--quiet"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("compare_settings_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_compare_settings_trains_diagnoses_and_compares_the_four(example, tmp_path, capsys):
    table = example.main([*TINY, "--out", str(tmp_path / "cmp")])
    assert set(table.index) == set(SETTINGS)
    assert all(math.isfinite(v) for v in table["elpd_loo"])
    assert sorted(table["rank"]) == [0, 1, 2, 3]
    out = capsys.readouterr().out
    assert "az.compare" in out and "elpd_loo" in out
    for setting in SETTINGS:
        diag = tmp_path / "cmp" / setting.replace("+", "_") / "diagnose-test"
        assert (diag / "inference_data.nc").is_file() and (diag / "pareto_k.png").is_file()
        # The comparison ranks by the PSIS-LOO that diagnose reported (independent draws).
        reported = json.loads((diag / "diagnostics.json").read_text())["loo"]["elpd_loo"]
        assert table.loc[setting, "elpd_loo"] == pytest.approx(reported, rel=1e-5)
