"""The estimator's DDIM schedule and update against hand-computed values and diffusers."""

from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.estimator import DepthEstimator
import pytest
import torch


@pytest.fixture(scope='module')
def estimator(random_model_dir):
    return DepthEstimator(EstimatorConfig(ModelConfig(model=random_model_dir, device='cpu'),
                                          InferenceConfig()))


@pytest.mark.parametrize('steps, timesteps, previous', [
    # trailing spacing: round(arange(1000, 0, -1000 / steps)) - 1; predecessor t - 1000 // steps
    (4, [999, 749, 499, 249], [749, 499, 249, -1]),
    (3, [999, 666, 332], [666, 333, -1]),  # 1000 // 3 = 333, not the next timestep
    (1, [999], [-1]),
])
def test_full_strength_schedule_by_hand(estimator, steps, timesteps, previous):
    """Full strength: the scheduler's trailing timesteps, predecessors as diffusers' DDIM."""
    got_t, got_prev, tensors = estimator._schedule(steps, 1.0)
    assert got_t == timesteps and got_prev == previous
    assert [int(t) for t in tensors] == timesteps
    assert estimator._schedule(steps, 1.0)[0] is got_t  # cached


@pytest.mark.parametrize('strength, steps, timesteps', [
    (0.5, 2, [499, 249]),  # span 500: arange(500, 0, -250) - 1
    (0.35, 4, [349, 261, 174, 87]),  # span 350, step 87.5: round half to even 262.5 -> 262
    (0.002, 4, [3, 2, 1, 0]),  # span round(2) < steps: widened to 4
    (0.999, 1, [998]),  # span 999, not the full schedule's 1000
])
def test_warm_start_schedule_by_hand(estimator, strength, steps, timesteps):
    """Warm start: ``steps`` timesteps over the first ``strength`` of training, chained."""
    got_t, got_prev, tensors = estimator._schedule(steps, strength)
    assert got_t == timesteps
    assert got_prev == timesteps[1:] + [-1]
    assert [int(t) for t in tensors] == timesteps


@pytest.mark.parametrize('kind', ['v_prediction', 'epsilon', 'sample'])
@pytest.mark.parametrize('t, prev_t', [(749, 499), (249, -1), (250, 0)])
@pytest.mark.parametrize('alpha_to_one', [False, True])
def test_ddim_step_equals_diffusers(estimator, kind, t, prev_t, alpha_to_one):
    """
    Check the closed-form update against diffusers' DDIMScheduler.step with eta = 0.

    With set_alpha_to_one the final alpha (prev_t -1) is 1, not alphas_cumprod[0]: only
    then do predecessor 0 and the final step differ.
    """
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler.from_config(estimator.scheduler.config, prediction_type=kind,
                                          set_alpha_to_one=alpha_to_one)
    scheduler.set_timesteps(4)  # predecessor t - 250, as given
    generator = torch.Generator().manual_seed(5)
    output = torch.randn((1, 4, 3, 3), generator=generator, dtype=torch.float64)
    sample = torch.randn((1, 4, 3, 3), generator=generator, dtype=torch.float64)
    expected = scheduler.step(output, t, sample, eta=0.0).prev_sample
    saved = estimator.scheduler
    estimator.scheduler = scheduler
    try:
        got = estimator._ddim_step(output, t, prev_t, sample)
    finally:
        estimator.scheduler = saved
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_closed_form_only_for_a_plain_ddim(estimator):
    """Clipping, thresholding, another prediction type or scheduler need diffusers' step."""
    from diffusers import DDIMScheduler, LCMScheduler
    config = estimator.scheduler.config
    saved = estimator.scheduler
    cases = [(DDIMScheduler.from_config(config), True),
             (DDIMScheduler.from_config(config, prediction_type='epsilon'), True),
             (DDIMScheduler.from_config(config, prediction_type='sample'), True),
             (DDIMScheduler.from_config(config, clip_sample=True), False),
             (DDIMScheduler.from_config(config, thresholding=True), False),
             (LCMScheduler.from_config(config), False)]
    try:
        for scheduler, closed in cases:
            estimator.scheduler = scheduler
            assert estimator._closed_form_ddim() is closed, scheduler
    finally:
        estimator.scheduler = saved
