import pytest

from train.schedule import wsd_lr


def test_wsd_warmup_stable_drop_decay():
    kw = dict(lr=4e-4, max_steps=100, warmup_steps=10, drop_step=50, drop_lr=1e-4, decay_steps=20, final_lr=1e-5)
    assert wsd_lr(0, **kw) == pytest.approx(4e-5)
    assert wsd_lr(9, **kw) == pytest.approx(4e-4)
    assert wsd_lr(30, **kw) == pytest.approx(4e-4)
    assert wsd_lr(49, **kw) == pytest.approx(4e-4)
    assert wsd_lr(50, **kw) == pytest.approx(1e-4)
    assert wsd_lr(79, **kw) == pytest.approx(1e-4)
    assert wsd_lr(80, **kw) == pytest.approx(1e-4 + (1e-5 - 1e-4) / 20)
    assert wsd_lr(99, **kw) == pytest.approx(1e-5)
    lrs = [wsd_lr(s, **kw) for s in range(80, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_wsd_without_drop_or_decay_is_constant_after_warmup():
    assert wsd_lr(500, lr=1e-3, max_steps=1000, warmup_steps=0) == 1e-3
    assert wsd_lr(999, lr=1e-3, max_steps=1000, warmup_steps=0, decay_steps=100, final_lr=0.0) == pytest.approx(0.0)
