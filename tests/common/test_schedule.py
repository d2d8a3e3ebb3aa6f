"""The shared learning-rate schedule: linear warm-up, cosine decay, a constant tail, a time-based progress."""

import math

from transfusion_mot.common.schedule import warmup_cosine


def test_warmup_cosine_closed_form():
    base, lo, warm, total = 3e-4, 1.5e-5, 4000, 100_000
    assert math.isclose(warmup_cosine(0, base, warm, total, lo), base / warm)
    assert math.isclose(warmup_cosine(warm - 1, base, warm, total, lo), base)
    assert math.isclose(warmup_cosine(warm, base, warm, total, lo), base)
    mid = warm + (total - warm) // 2
    assert math.isclose(warmup_cosine(mid, base, warm, total, lo), lo + 0.5 * (base - lo), rel_tol=1e-6)
    assert math.isclose(warmup_cosine(total, base, warm, total, lo), lo)
