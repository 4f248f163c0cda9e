"""``benchmarks/phase_timers.py``: megatron's timer calls summed per step, and uninstalled after."""

import pytest

from tests.benchmarks.script_helpers import load_script

phase_timers = load_script("phase_timers")


def test_phase_timers_sum_intervals_per_step_and_uninstall():
    import types

    timers = phase_timers.PhaseTimers(cuda=False)
    model_config, optimizer_config = types.SimpleNamespace(timers=None), types.SimpleNamespace(timers=None)
    with phase_timers.installed(timers, [model_config, model_config, optimizer_config]):
        assert model_config.timers is timers and optimizer_config.timers is timers
        for _ in range(2):  # megatron's calls: a log level and barrier= on start, a bare stop
            model_config.timers("forward-backward", log_level=1).start(barrier=True)
            for _ in range(3):  # one interval per micro-batch, summed per step
                model_config.timers("forward-compute", log_level=2).start()
                model_config.timers("forward-compute").stop()
            model_config.timers("forward-backward").stop()
            optimizer_config.timers("some-new-phase", log_level=1).start(barrier=False)
            optimizer_config.timers("some-new-phase").stop()
            timers.end_step()
        with pytest.raises(RuntimeError, match="started twice"):
            timers("x").start()
            timers("x").start()
    assert model_config.timers is None and optimizer_config.timers is None
    steps = timers.per_step_ms()
    assert [sorted(step) for step in steps] == [["forward-backward", "forward-compute", "some-new-phase"]] * 2
    assert all(step["forward-compute"] <= step["forward-backward"] for step in steps)
    medians = phase_timers.phase_medians(steps, ["forward-backward", "forward-compute", "some-new-phase", "unseen"])
    assert list(medians) == ["forward-backward", "forward-compute", "some-new-phase"]
    assert phase_timers.outside_ms(
        10.0, {"forward-backward": 6.0, "forward-compute": 5.0, "optimizer-inner-step": 1.5}
    ) == pytest.approx(2.5)
