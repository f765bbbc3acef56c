"""benchmarks/cleanlab_compare.py on a tiny finished run (skipped where cleanlab is not installed: it is
not a dependency of the package)."""
import sys
from pathlib import Path

import numpy as np
import pytest

from clear_fast.train import main
from conftest import cli

pytest.importorskip("cleanlab")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import cleanlab_compare  # noqa: E402


def test_both_filters_score_the_runs_own_pass(tiny_models, toy_files, tmp_path):
    out = tmp_path / "run"
    assert main(cli(tiny_models["bert"], toy_files, out, "--num-epochs", "2", "--no-plots")) == 0
    observed, clean, p_clean, probs, names = cleanlab_compare.load_run(out)
    assert probs.shape == (160, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert 0 < clean.sum() < 160
    r = cleanlab_compare.compare(out)
    # cleanlab's self-confidence is exp(-loss): the same ranking as the loss row
    assert r["cleanlab"]["auroc"] == pytest.approx(r["loss"]["auroc"], abs=1e-9)
    assert r["clear"]["kept_fraction"] == pytest.approx(float(np.mean(p_clean > 0.5)))
    assert r["made_with"]["noise_type"] == "symmetric" and r["samples"] == 160
