"""r schedules, token counts and analytic FLOPs."""

import pytest

from tome_jax import schedule


def test_parse_r_forms():
    assert schedule.parse_r(16, depth=12) == [16] * 12
    assert schedule.parse_r([4, 3], depth=4) == [4, 3, 0, 0]
    assert schedule.parse_r((16, -1), depth=12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert schedule.parse_r((16, 1), depth=12) == [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32]
    assert schedule.parse_r((16, 0), depth=12) == [16] * 12
    assert sum(schedule.parse_r((8, -1), depth=12)) in range(8 * 12 - 12, 8 * 12 + 1)


def test_parse_r_depth_is_keyword_only():
    # The reference ToMe's parse_r(num_layers, r) order must fail, not mean r=12 over 16 blocks.
    with pytest.raises(TypeError):
        schedule.parse_r(12, 16)


def test_vit_b16_r16_leaves_11_tokens():
    rs, tokens = schedule.token_schedule(16, 12, 197, protected=1)
    assert rs == [16] * 11 + [10]
    assert tokens[-1] == 11
    assert tokens == [197 - 16 * i for i in range(12)] + [11]


def test_decreasing_schedule_is_clamped():
    rs, tokens = schedule.token_schedule((16, -1), 12, 197)
    assert rs[0] == 32 and tokens[1] == 165
    assert all(r <= (t - 1) // 2 for r, t in zip(rs, tokens, strict=False))


def test_flops_vit_b16():
    base = schedule.flops("B/16", 224)
    # 17.56 GMACs is the figure papers (fvcore) report as "17.6 GFLOPs" for ViT-B/16.
    assert base / 2 == pytest.approx(17.56e9, rel=2e-3)
    r16 = schedule.flops("B/16", 224, 16)
    assert base / r16 == pytest.approx(2.0, abs=0.02)
    assert schedule.flops("B/16", 224, (16, -1)) < r16
    # FLOPs fall monotonically with r.
    values = [schedule.flops("B/16", 224, r) for r in range(0, 20, 2)]
    assert values == sorted(values, reverse=True)


def test_flops_by_hand_tiny():
    # mu/8 at 16 px: 4 patches + cls, width 32, mlp 128, one block, r=1, 10 classes.
    t, d, m = 5, 32, 128
    macs = 4 * 8 * 8 * 3 * d + 3 * t * d * d + 2 * t * t * d + t * d * d + 2 * (t - 1) * d * m
    macs += d * 10
    assert schedule.flops("mu/8", 16, 1, num_classes=10) == 2 * macs


@pytest.mark.parametrize("bad,match", [
    (([1] * 13), "13 entries"),
    (-1, ">= 0"),
    (2.5, "must be an int"),
    ((8, -2), "inflect"),
    ((8, 1, 2), "tuple must be"),
])
def test_bad_schedules(bad, match):
    with pytest.raises(ValueError, match=match):
        schedule.parse_r(bad, depth=12)


def test_explicit_list_that_cannot_be_met():
    with pytest.raises(ValueError, match="cannot be met in block 1"):
        schedule.token_schedule([4, 4], 2, 9)
    # An int is clamped as in the paper instead.
    assert schedule.token_schedule(4, 2, 9) == ([4, 2], [9, 5, 3])


def test_flops_bad_resolution():
    with pytest.raises(ValueError, match="not divisible"):
        schedule.flops("B/16", 225)


def test_parse_schedule_text():
    assert schedule.parse_schedule("16") == 16
    assert schedule.parse_schedule("16,-1") == (16, -1.0)
    assert schedule.parse_schedule("[8, 8, 4]") == [8, 8, 4]
    with pytest.raises(ValueError, match="cannot read the r schedule '1,2,3'"):
        schedule.parse_schedule("1,2,3")
