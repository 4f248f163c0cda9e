"""The theoretical cost a job's summary reports is that of the stages it runs: a control arm
(token stage alone) costs what token-level training costs, not what the two-stage job does; and
at the λ the job's steps realize (round(λN) / N), not the one asked for."""

import pytest

from megatron_patch.training.plan import make_plan


def _plan(patch_size, fraction, stages, train_iters=12):
    return make_plan(
        patch_size=patch_size,
        patch_data_fraction=fraction,
        stages=stages,
        seq_length=32,
        micro_batch_size=2,
        global_batch_size=16,
        data_parallel_size=1,
        eval_iters=0,
        train_iters=train_iters,
    )


@pytest.mark.parametrize(
    "stages, fraction, expected",
    [
        ("both", 2 / 3, 2 / 3 / 4 + 1 / 3),
        ("both", 1 / 4, 1 / 16 + 3 / 4),
        ("patch", 2 / 3, 1 / 4),
        ("token", 1 / 4, 1.0),
    ],
)
def test_theoretical_cost_is_that_of_the_stages_run(stages, fraction, expected):
    assert _plan(4, fraction, stages).theoretical_relative_cost == pytest.approx(expected, abs=1e-12)


def test_token_only_training_costs_one():
    assert _plan(1, 2 / 3, "both").theoretical_relative_cost == 1.0


def test_the_theory_is_at_the_fraction_the_steps_realize():
    """11 steps at λ=2/3 are 7 patch + 4 token steps: 7/11/4 + 4/11, not 2/3/4 + 1/3."""
    plan = _plan(4, 2 / 3, "both", train_iters=11)
    assert plan.patch_iters == 7
    assert plan.theoretical_relative_cost == pytest.approx(7 / 11 / 4 + 4 / 11, abs=1e-12)
