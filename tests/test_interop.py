"""diffusers models as flowdiff fields (flowdiff.interop).

The truth here is diffusers itself: its own schedulers' sampling loops (DDIMScheduler,
DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler) on randomly initialised tiny UNets,
from the same initial noise, against flowdiff's solvers on the converted field with the grid of
``fd.interop.sample_kwargs``. They must agree to float32 round-off, relative to the size of the
result (an epsilon model's x̂ at the noisy end is (x − σε̂)/α with α ≈ 6e-3, so the states reach
hundreds). Plus an analytic check of the timestep ↔ time map (a Gaussian oracle written as a
diffusers-style model), the β tables, and the bad-input errors.
"""

from __future__ import annotations

import pytest
import torch

import flowdiff as fd
from flowdiff import interop

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")

PREDICTIONS = ("epsilon", "sample", "v_prediction")
#: float32 round-off of a loop, relative to max |result|. Measured: <= 1.2e-6 here, <= 3.5e-6 on the larger
#: UNet of benchmarks/interop.py (a data-predicting random net passes its input's round-off on).
#: The mistakes this must catch are far above: a time map off by one timestep gives 1e-2, a wrong
#: lower-order-final policy 5e-2 on the v model (5.8e-6 on the epsilon model, whose scale 1/alpha hides it).
RTOL = 1e-5


def tiny_unet(out_channels: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        **kw,
    ).eval()


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_unet()


def noise(shape=(2, 3, 8, 8), seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def diffusers_loop(model, scheduler, x: torch.Tensor, channels: int | None = None, **cond) -> torch.Tensor:
    """The loop of diffusers' pipelines: model at each timestep, then scheduler.step."""
    step_kw = {"use_clipped_model_output": True} if isinstance(scheduler, diffusers.DDIMScheduler) else {}
    for t in scheduler.timesteps:
        out = model(x, t, **cond).sample
        x = scheduler.step(out[:, :channels] if channels else out, t, x, **step_kw).prev_sample
    return x


@torch.no_grad()
def flowdiff_run(model, scheduler, x: torch.Tensor, t_max: float | None = None, **cond) -> fd.SampleResult:
    field = interop.from_diffusers(model, scheduler, t_max=t_max)
    return fd.sample(field, x, cond=cond or None, **interop.sample_kwargs(scheduler))


def assert_round_off(got: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max())
    assert err <= rtol * scale, f"max |flowdiff - diffusers| = {err:.3g}, {err / scale:.3g} of max |x| = {scale:.3g}"


# ----- the loops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_reproduces_diffusers(unet, prediction, spacing):
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction, clip_sample=False, timestep_spacing=spacing)
    scheduler.set_timesteps(10)
    x = noise()
    ref = diffusers_loop(unet, scheduler, x.clone())
    res = flowdiff_run(unet, scheduler, x.clone())
    assert res.solver == "ddim" and res.nfe == 10
    assert_round_off(res.x, ref)


@pytest.mark.parametrize("spacing,final", [("linspace", "zero"), ("leading", "sigma_min"), ("trailing", "zero"),
                                           ("linspace", "sigma_min")])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpm_solver_pp_2m_reproduces_diffusers(unet, prediction, spacing, final):
    scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type=prediction, timestep_spacing=spacing,
                                                      final_sigmas_type=final)
    scheduler.set_timesteps(10)
    x = noise()
    ref = diffusers_loop(unet, scheduler, x.clone())
    res = flowdiff_run(unet, scheduler, x.clone())
    assert res.solver == "dpm-solver++2m" and res.nfe == 10
    assert_round_off(res.x, ref)


@pytest.mark.parametrize("steps", [6, 16])
def test_dpm_solver_order_3_heun_and_noise_form_reproduce_diffusers(unet, steps):
    """The other DPM-Solver settings the translation covers: order 3 (its lower-order last steps
    below 15 steps and not above; below 15 with a last step into sigma = 0 it needs t_max = 1),
    solver_type="heun" and the noise-prediction algorithm."""
    for kw in ({"solver_order": 3, "final_sigmas_type": "sigma_min"}, {"solver_order": 3}, {"solver_type": "heun"},
               {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}):
        scheduler = diffusers.DPMSolverMultistepScheduler(**kw)
        scheduler.set_timesteps(steps)
        x = noise()
        ref = diffusers_loop(unet, scheduler, x.clone())
        res = flowdiff_run(unet, scheduler, x.clone(), t_max=1.0 if kw == {"solver_order": 3} else None)
        assert res.nfe == steps
        assert_round_off(res.x, ref)


def test_ddim_final_step_without_alpha_one_and_steps_offset(unet):
    """set_alpha_to_one=False ends on the first training step; steps_offset=1 shifts every timestep."""
    for kw in ({"set_alpha_to_one": False}, {"set_alpha_to_one": False, "steps_offset": 1}):
        scheduler = diffusers.DDIMScheduler(clip_sample=False, **kw)
        scheduler.set_timesteps(10)
        x = noise()
        ref = diffusers_loop(unet, scheduler, x.clone())
        assert_round_off(flowdiff_run(unet, scheduler, x.clone()).x, ref)


@pytest.mark.parametrize("scheduler_class,eta", [("DDIMScheduler", 0.5), ("DDIMScheduler", 1.0), ("DDPMScheduler", 1.0)])
def test_stochastic_ddim_and_ddpm_reproduce_diffusers_draws(unet, scheduler_class, eta):
    """DDIM-eta and DDPM (with its default clip_sample) draw one normal per step from the
    generator, as flowdiff's ddpm solver does: with the same seed, the same result."""
    scheduler = getattr(diffusers, scheduler_class)(prediction_type="v_prediction")
    scheduler.set_timesteps(10)
    x, generator = noise(), torch.Generator().manual_seed(7)
    step_kw = {"eta": eta, "use_clipped_model_output": True} if scheduler_class == "DDIMScheduler" else {}
    with torch.no_grad():
        y = x.clone()
        for t in scheduler.timesteps:
            y = scheduler.step(unet(y, t).sample, t, y, generator=generator, **step_kw).prev_sample
        kwargs = interop.sample_kwargs(scheduler, eta=eta)
        res = fd.sample(interop.from_diffusers(unet, scheduler), x.clone(), generator=torch.Generator().manual_seed(7),
                        **kwargs)
    assert kwargs["solver"] == "ddpm" and res.nfe == 10
    assert_round_off(res.x, y)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_euler_reproduces_diffusers(unet, shift):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(8)
    x = noise()
    ref = diffusers_loop(unet, scheduler, x.clone())
    field = interop.from_diffusers(unet, scheduler)
    assert isinstance(field.path, fd.paths.Linear) and field.prediction == "velocity"
    res = flowdiff_run(unet, scheduler, x.clone())
    assert res.solver == "euler" and res.nfe == 8
    assert_round_off(res.x, ref)


def test_conditional_unet_passes_encoder_hidden_states():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    ).eval()
    emb = noise((2, 5, 8), seed=2)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                      timestep_spacing="leading", steps_offset=1)
    scheduler.set_timesteps(6)
    x = noise((2, 4, 8, 8), seed=3)
    ref = diffusers_loop(unet, scheduler, x.clone(), encoder_hidden_states=emb)
    assert_round_off(flowdiff_run(unet, scheduler, x.clone(), encoder_hidden_states=emb).x, ref)
    other = flowdiff_run(unet, scheduler, x.clone(), encoder_hidden_states=emb.flip(0)).x
    assert float((other - ref).abs().max()) > 1e-2 * float(ref.abs().max())  # the conditioning is really used


def test_classifier_free_guidance_as_stable_diffusion_applies_it():
    """guidance_scale with cond["uncond"]: the loop of StableDiffusionPipeline (doubled batch,
    [negative, positive] embeddings, u + w (c - u) on the network output)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    ).eval()
    emb, null = noise((2, 5, 8), seed=2), noise((2, 5, 8), seed=4)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(6)
    x = noise((2, 4, 8, 8), seed=3)
    y, w = x.clone(), 4.0
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat([y, y]), t, encoder_hidden_states=torch.cat([null, emb])).sample
            uncond, cond = out.chunk(2)
            y = scheduler.step(uncond + w * (cond - uncond), t, y).prev_sample
        field = interop.from_diffusers(unet, scheduler, guidance_scale=w)
        res = fd.sample(field, x.clone(), cond={"encoder_hidden_states": emb, "uncond": {"encoder_hidden_states": null}},
                        **interop.sample_kwargs(scheduler))
    assert res.nfe == 6
    assert_round_off(res.x, y)
    with pytest.raises(ValueError, match="uncond"):
        field.denoise(x, 0.5, encoder_hidden_states=emb)


def test_class_conditional_learned_variance_and_clipping():
    """num_class_embeds (class_labels), a learned-variance output (twice the channels: its first
    half is the prediction) and clip_sample (diffusers with use_clipped_model_output=True)."""
    unet = tiny_unet(out_channels=6, num_class_embeds=3)
    labels = torch.tensor([0, 2])
    scheduler = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, timestep_spacing="trailing")
    scheduler.set_timesteps(5)
    x = noise()
    ref = diffusers_loop(unet, scheduler, x.clone(), channels=3, class_labels=labels)
    assert float(ref.abs().max()) == 1.0  # the clipping was active
    assert_round_off(flowdiff_run(unet, scheduler, x.clone(), class_labels=labels).x, ref)


def test_pipeline_and_pair_are_accepted(unet):
    scheduler = diffusers.DDIMScheduler(clip_sample=False, prediction_type="v_prediction")
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    for field in (interop.from_diffusers(pipe), interop.from_diffusers((unet, scheduler)),
                  interop.from_diffusers(unet, dict(scheduler.config))):
        assert field.prediction == "v" and isinstance(field.path, fd.paths.Discrete)
        assert field.model.model is unet


def test_flowdiff_solvers_run_on_the_converted_field(unet):
    """A converted field is an ordinary field: flowdiff's own grids and solvers sample it."""
    field = interop.from_diffusers(unet, diffusers.DDIMScheduler().config)
    with torch.no_grad():
        for solver in ("dpm-solver++", "unipc", "ddim"):
            res = fd.sample(field, noise(), solver=solver, nfe=8)
            assert torch.isfinite(res.x).all() and res.nfe == 8


# ----- the time map, against truth -----------------------------------------------------------------


def test_timestep_map_against_a_gaussian_oracle():
    r"""Data N(m, s²): at diffusers timestep j the exact ε̂ is a closed form in ᾱ_j. Written as a
    diffusers-style model, the converted field's x̂ at flowdiff time t(j) must be the exact posterior
    mean at ᾱ_j — an off-by-one in j(t) would use ᾱ_{j±1}."""
    config = diffusers.DDPMScheduler(beta_schedule="scaled_linear").config
    ac = interop.alphas_cumprod(config).double()
    m, s = 0.7, 0.4

    def model(x, timestep):
        a2 = ac[timestep.long()].view(-1, 1)
        var = a2 * s * s + (1 - a2)
        return (1 - a2).sqrt() * (x - a2.sqrt() * m) / var  # E[ε | x_j]

    field = interop.from_diffusers(model, config)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).view(-1, 1)
    for j in (0, 1, 499, 998, 999):
        t = 1 - (j + 1) / 1000
        a2 = float(ac[j])
        exact = m + a2**0.5 * s * s / (a2 * s * s + 1 - a2) * (x - a2**0.5 * m)
        torch.testing.assert_close(field.denoise(x, t), exact, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(field.path.alpha(torch.tensor(t, dtype=torch.float64)) ** 2, torch.tensor(a2, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "linear", "num_train_timesteps": 50, "beta_end": 0.2},
])
def test_alphas_cumprod_is_diffusers_table(config):
    for cls in (diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler):
        scheduler = cls(**config)
        assert torch.equal(interop.alphas_cumprod(dict(scheduler.config)), scheduler.alphas_cumprod)
    sigmoid = diffusers.DDPMScheduler(beta_schedule="sigmoid")
    assert torch.equal(interop.alphas_cumprod(dict(sigmoid.config)), sigmoid.alphas_cumprod)
    zero_snr = diffusers.DPMSolverMultistepScheduler(rescale_betas_zero_snr=True, **config)
    torch.testing.assert_close(interop.alphas_cumprod(dict(zero_snr.config)), zero_snr.alphas_cumprod, rtol=1e-6, atol=0)


# ----- bad input --------------------------------------------------------------------------------------


def test_bad_prediction_type(unet):
    with pytest.raises(ValueError, match=r"'x_start'.*epsilon, sample, v_prediction"):
        interop.from_diffusers(unet, {"prediction_type": "x_start"})
    with pytest.raises(ValueError, match=r"'epsilon'.*flow_prediction"):
        interop.from_diffusers(unet, diffusers.FlowMatchEulerDiscreteScheduler().config, prediction="epsilon")


def test_bad_beta_schedule(unet):
    with pytest.raises(ValueError, match=r"'cosine'.*linear, scaled_linear, squaredcos_cap_v2"):
        interop.from_diffusers(unet, {"beta_schedule": "cosine"})


def test_bad_model_and_scheduler(unet):
    with pytest.raises(TypeError, match="needs a scheduler"):
        interop.from_diffusers(unet)
    with pytest.raises(TypeError, match="scheduler must be"):
        interop.from_diffusers(unet, 42)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        interop.from_diffusers(unet, {"num_train_timesteps": 1})


def test_loops_no_grid_reproduces_are_refused(unet):
    ddim = diffusers.DDIMScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="linspace"):
        interop.sample_kwargs(ddim, 10)
    karras = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="karras"):
        interop.sample_kwargs(karras, 10)
    flow_dpm = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="use_flow_sigmas truncated to integers"):
        interop.sample_kwargs(flow_dpm, 8)
    with pytest.raises(ValueError, match="unsupported scheduler 'EulerDiscreteScheduler'"):
        interop.sample_kwargs(diffusers.EulerDiscreteScheduler(), 10)
    with pytest.raises(TypeError, match="scheduler object"):
        interop.scheduler_grid(dict(ddim.config))


# ----- the reverse: a flowdiff solver where diffusers expects a scheduler ----------------------------


@pytest.mark.parametrize("solver", ["dpm-solver++", "unipc", "deis", "euler", "sde-dpm-solver++"])
def test_flowdiff_scheduler_in_a_diffusers_loop_equals_fd_sample(unet, solver):
    base = diffusers.DDIMScheduler(prediction_type="v_prediction")
    scheduler = interop.FlowdiffScheduler.from_scheduler(base, solver)
    scheduler.set_timesteps(8)
    assert len(scheduler.timesteps) == 8 and int(scheduler.timesteps[0]) == 999
    x = noise()
    with torch.no_grad():
        y, gen = x.clone(), torch.Generator().manual_seed(3)
        for t in scheduler.timesteps:
            y = scheduler.step(unet(y, t).sample, t, y, generator=gen).prev_sample
        ref = fd.sample(interop.from_diffusers(unet, base), x.clone(), solver=solver, nfe=8,
                        generator=torch.Generator().manual_seed(3))
    assert ref.nfe == 8
    assert_round_off(y, ref.x, rtol=1e-6)


def test_flowdiff_scheduler_drives_a_pipeline(unet):
    """DDPMPipeline with its scheduler swapped for flowdiff's UniPC gives fd.sample's images."""
    base = diffusers.DDPMScheduler()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=base)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = interop.FlowdiffScheduler(pipe.scheduler, "unipc")
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=6, output_type="pt").images
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5))  # the pipeline's draw
    with torch.no_grad():
        ref = fd.sample(interop.from_diffusers(unet, base), x, solver="unipc", nfe=6).x
    assert_round_off(images, (ref / 2 + 0.5).clamp(0, 1), rtol=1e-6)


def test_flowdiff_scheduler_on_a_flow_model(unet):
    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler = interop.FlowdiffScheduler(base, "unipc", t_start=1e-3)  # log-SNR solvers start after alpha = 0
    scheduler.set_timesteps(6)
    x = noise()
    with torch.no_grad():
        y = x.clone()
        for t in scheduler.timesteps:
            y = scheduler.step(unet(y, t).sample, t, y).prev_sample
        ref = fd.sample(interop.from_diffusers(unet, base), x.clone(), solver="unipc", nfe=6, t_start=1e-3)
    assert_round_off(y, ref.x, rtol=1e-6)


def test_flowdiff_scheduler_bad_input(unet):
    with pytest.raises(ValueError, match=r"'heun'.*valid: .*dpm-solver\+\+"):
        interop.FlowdiffScheduler(diffusers.DDIMScheduler(), "heun")
    scheduler = interop.FlowdiffScheduler(diffusers.DDIMScheduler(), "ddim")
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 3, 8, 8), 999, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(1)


def test_importing_flowdiff_does_not_import_diffusers():
    """fd.interop reads diffusers objects through their attributes: `import flowdiff` stays light."""
    import subprocess
    import sys

    code = "import sys, flowdiff; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
