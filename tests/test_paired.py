"""tome_jax.paired and its CLI: McNemar's exact test against scipy, the paired difference."""

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tome_jax import paired
from tome_jax.cli.paired import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 9), (40, 52), (120, 121), (500, 430)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    want = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert paired.mcnemar_exact_p(b, c) == pytest.approx(want, rel=1e-9)


def test_paired_difference_counts_discordant_pairs():
    ref = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool)
    other = np.array([1, 0, 1, 1, 1, 1, 0, 1], bool)
    s = paired.paired_difference(ref, other)
    assert (s["only_ref"], s["only_other"], s["n"]) == (1, 2, 8)
    assert s["diff"] == pytest.approx(other.mean() - ref.mean())
    d = other.astype(float) - ref
    half = 1.96 * d.std(ddof=1) / np.sqrt(8)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))


def test_paired_difference_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same N"):
        paired.paired_difference(np.ones(3, bool), np.ones(4, bool))


@pytest.mark.slow  # two models over the 1,000 shipped images: about 1-2 min on 2 cores
def test_cli_on_the_shipped_images(tmp_path):
    """A model against itself: no discordant image, difference 0, p = 1."""
    out = tmp_path / "paired.md"
    model, images = ROOT / "models" / "cifar10_vit", ROOT / "data" / "cifar10-test-1000"
    table = main([f"A={model}", f"B={model}", "--r", "4", "--data", "image_folder",
                         "--data-dir", str(images), "--batch-size", "250", "--out", str(out)])
    assert "| B | " in table and "+0.00 (+0.00 to +0.00) | 0 / 0 | 1 |" in table
    assert "1000 images, r = 4" in out.read_text()
