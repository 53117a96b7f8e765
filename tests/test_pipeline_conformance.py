"""Combined generation behaves as the stock diffusers pipeline it extends: what a user does with
`StableDiffusionPipeline` (and SDXL, SD3, PixArt-α) works the same on the combined and AIG pipelines.

Each feature is compared with the stock pipeline where the switch makes them equal: all steps on the base model
(`original_unet_steps = N`) is the stock pipeline with the base model; none (`= 0`) is the stock pipeline with the
tuned model at `fine_tuned_guidance_scale`. In between, the call log of the two models shows who ran which step.
diffusers' own pipeline test suite is run against these classes by `tools/diffusers_tests.py` (it needs the diffusers
sources); this module needs nothing but the installed packages."""
import copy, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest, torch
from diffusers import (HeunDiscreteScheduler, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.models.attention_processor import FusedAttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection
from imagerefl.core import UserError
from imagerefl.sampling import (AIGStableDiffusionPipeline, CombinedPixArtAlphaPipeline, CombinedStableDiffusion3Pipeline,
                                CombinedStableDiffusionPipeline, CombinedStableDiffusionXLPipeline)
from imagerefl.testing import tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

N, PROMPT = 4, ["a photo of a cat", "a red bicycle"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def family(make, denoiser="unet", sched=None):
    "(base pipeline, tuned stock pipeline, combined pipeline): the same encoders, VAE and scheduler, two denoisers."
    base = make(0) if sched is None else make(0, sched)
    other = make(1) if sched is None else make(1, sched)
    kw = dict(requires_safety_checker=False) if isinstance(base, StableDiffusionPipeline) else \
         dict(add_watermarker=False) if isinstance(base, StableDiffusionXLPipeline) else {}
    tuned = type(base)(**{**base.components, denoiser: other.components[denoiser]}, **kw)
    tuned.set_progress_bar_config(disable=True)
    comb = {"unet": CombinedStableDiffusionXLPipeline if isinstance(base, StableDiffusionXLPipeline) else CombinedStableDiffusionPipeline,
            "transformer": CombinedStableDiffusion3Pipeline if "text_encoder_3" in base.components else CombinedPixArtAlphaPipeline}[denoiser]
    return base, tuned, comb.from_pipelines(base, tuned.components[denoiser])


def run(pipe, seed=0, **kw):
    kw = {"num_inference_steps": N, "output_type": "pt", **kw}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kw).images


class log_calls(list):
    "A list of which of `models` ran, call by call (`unhook` removes the hooks)."
    def __init__(self, *models):
        super().__init__()
        self.hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: self.append(i)) for i, m in enumerate(models)]


def unhook(calls):
    for h in calls.hooks: h.remove()


def ends_equal(base, tuned, comb, **kw):
    "Both ends of the switch equal the stock pipelines, bit for bit."
    assert torch.equal(run(comb, original_unet_steps=N, **kw), run(base, **kw))
    assert torch.equal(run(comb, original_unet_steps=0, **kw), run(tuned, guidance_scale=1.0, **kw))


@pytest.fixture(scope="module")
def sd(): return family(tiny_sd_pipeline)


@pytest.fixture(scope="module")
def sdxl(): return family(tiny_sdxl_pipeline)


def test_callback_sees_its_tensors_and_the_step_properties_at_the_switch(sd):
    base, tuned, comb = sd
    inputs = comb._callback_tensor_inputs
    def recorder(seen):
        def cb(p, i, t, kw):
            seen.append(dict(i=i, g=p.guidance_scale, cfg=p.do_classifier_free_guidance, n=p.num_timesteps,
                             **{k: kw[k].clone() for k in inputs}))
            if i == 1: kw["latents"] = kw["latents"] * 0.5             # a callback may change the latents
            return kw
        return cb
    stock, ours = [], []
    a = run(base, callback_on_step_end=recorder(stock), callback_on_step_end_tensor_inputs=inputs)
    b = run(comb, original_unet_steps=N, callback_on_step_end=recorder(ours), callback_on_step_end_tensor_inputs=inputs)
    assert torch.equal(a, b) and len(stock) == len(ours) == N
    for s, o in zip(stock, ours):
        assert s.keys() == o.keys() and all(torch.equal(s[k], o[k]) if torch.is_tensor(s[k]) else s[k] == o[k] for k in s)
    mid = []
    run(comb, original_unet_steps=2, callback_on_step_end=recorder(mid), callback_on_step_end_tensor_inputs=inputs)
    assert [m["i"] for m in mid] == list(range(N)) and mid[2]["g"] == 7.5 and mid[2]["cfg"]
    assert mid[2]["prompt_embeds"].shape == stock[2]["prompt_embeds"].shape and not torch.equal(mid[3]["latents"], stock[3]["latents"])


def test_interrupt_stops_the_loop(sd):
    base, tuned, comb = sd
    def stop_after_first(p, i, t, kw): p._interrupt = True; return kw
    calls = log_calls(comb.original_unet, comb.fine_tuned_unet)
    a = run(comb, original_unet_steps=0, callback_on_step_end=stop_after_first)
    unhook(calls)
    assert calls == [1]                                           # one tuned step, then nothing
    assert torch.equal(a, run(tuned, guidance_scale=1.0, callback_on_step_end=stop_after_first))


def test_prompt_encoding_without_a_vae(sd):
    base, tuned, comb = sd
    no_vae = CombinedStableDiffusionPipeline(**{**comb.components, "vae": None})
    ours, stock = no_vae.encode_prompt("a cat", "cpu", 1, True), base.encode_prompt("a cat", "cpu", 1, True)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock))


def ip_adapter_state_dict(unet, seed=0):
    "A random IP-Adapter for `unet`, in the layout `_load_ip_adapter_weights` reads (as diffusers' own tests build it)."
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    cross, key, blocks = unet.config.cross_attention_dim, 1, unet.config.block_out_channels
    attn = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"): continue
        hidden = blocks[-1] if name.startswith("mid_block") else \
                 list(reversed(blocks))[int(name[len("up_blocks.")])] if name.startswith("up_blocks") else blocks[int(name[len("down_blocks.")])]
        attn.update({f"{key}.to_k_ip.weight": rnd(hidden, cross), f"{key}.to_v_ip.weight": rnd(hidden, cross)}); key += 2
    proj = ImageProjection(cross_attention_dim=cross, image_embed_dim=cross, num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": rnd(*proj["image_embeds.weight"].shape), "proj.bias": proj["image_embeds.bias"],
                  "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": attn}


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_ip_adapter_images_reach_both_models(make):
    base, tuned, comb = family(make)
    comb.unet._load_ip_adapter_weights(ip_adapter_state_dict(base.unet))   # into both models, which `base` and `tuned` hold too
    assert isinstance(comb.fine_tuned_unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"],
                      IPAdapterAttnProcessor2_0)
    d = base.unet.config.cross_attention_dim
    embeds = [torch.randn(2, 2, 1, d, generator=torch.Generator().manual_seed(3))]   # [uncond, cond] x images
    ends_equal(base, tuned, comb, ip_adapter_image_embeds=[embeds[0].clone()])
    with_ip = run(comb, original_unet_steps=2, ip_adapter_image_embeds=embeds)
    comb.set_ip_adapter_scale(0.0)                                          # one scale, both models
    no_ip = run(comb, original_unet_steps=2, ip_adapter_image_embeds=embeds)
    assert (with_ip - no_ip).abs().max() > 1e-3
    comb.unload_ip_adapter()
    assert torch.equal(no_ip, run(comb, original_unet_steps=2)) and comb.fine_tuned_unet.encoder_hid_proj is None


def test_second_order_scheduler_runs_its_corrector_with_the_step_model(sd):
    base, tuned, comb = (copy.deepcopy(p) for p in sd)
    for p in (base, tuned, comb): p.scheduler = HeunDiscreteScheduler.from_config(base.scheduler.config)
    ends_equal(base, tuned, comb)
    calls = log_calls(comb.original_unet, comb.fine_tuned_unet)
    run(comb, original_unet_steps=2)
    unhook(calls)
    assert calls == [0, 0, 0, 0, 1, 1, 1]          # Heun: predictor + corrector a step, the last step a predictor


def test_custom_sigmas_and_timesteps():
    base, tuned, comb = family(tiny_sd_pipeline, sched="euler")
    sigmas = [14.6, 6.0, 2.0, 0.5]                      # Euler: the last is the final noise level, so 3 steps
    assert torch.equal(run(comb, original_unet_steps=3, sigmas=sigmas), run(base, sigmas=sigmas))
    assert torch.equal(run(comb, original_unet_steps=0, sigmas=sigmas), run(tuned, guidance_scale=1.0, sigmas=sigmas))
    with pytest.raises(UserError, match="num_inference_steps=3"): run(comb, original_unet_steps=4, sigmas=sigmas)
    base, tuned, comb = family(tiny_sd_pipeline, sched="ddpm")          # (DDIM takes no custom timesteps)
    ends_equal(base, tuned, comb, timesteps=[999, 700, 300, 50])


def test_guidance_distilled_unet_gets_each_phase_guidance_embedding():
    "An LCM-style UNet (`time_cond_proj_dim`) has its guidance scale as an input: each phase gets its own."
    def lcm(seed):
        pipe = tiny_sd_pipeline(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**{**pipe.unet.config, "time_cond_proj_dim": 16})
        pipe = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "scheduler": LCMScheduler.from_config(pipe.scheduler.config)},
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    base = lcm(0); other = lcm(1)
    tuned = StableDiffusionPipeline(**{**base.components, "unet": other.unet}, requires_safety_checker=False)
    tuned.set_progress_bar_config(disable=True)
    comb = CombinedStableDiffusionPipeline.from_pipelines(base, other.unet)
    assert torch.equal(run(comb, original_unet_steps=N, guidance_scale=4.0), run(base, guidance_scale=4.0))
    assert torch.equal(run(comb, original_unet_steps=0, fine_tuned_guidance_scale=2.0), run(tuned, guidance_scale=2.0))
    a = run(comb, original_unet_steps=2, guidance_scale=4.0, fine_tuned_guidance_scale=2.0)
    b = run(comb, original_unet_steps=2, guidance_scale=4.0, fine_tuned_guidance_scale=4.0)
    assert (a - b).abs().max() > 1e-4                     # the tuned phase's own w changed its steps


def test_sdxl_denoising_end(sdxl):
    base, tuned, comb = sdxl
    assert torch.equal(run(comb, original_unet_steps=N, denoising_end=0.5, output_type="latent"),
                       run(base, denoising_end=0.5, output_type="latent"))
    assert torch.equal(run(comb, original_unet_steps=0, denoising_end=0.5, output_type="latent"),
                       run(tuned, guidance_scale=1.0, denoising_end=0.5, output_type="latent"))


@pytest.mark.parametrize("which", ["freeu", "qkv"])
def test_unet_changes_reach_both_models(which):
    base, tuned, comb = family(tiny_sd_pipeline)   # base and tuned hold the combined pipeline's two UNets: only `comb` is changed
    if which == "freeu": comb.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    else: comb.fuse_qkv_projections()
    for unet in (comb.original_unet, comb.fine_tuned_unet):
        if which == "qkv": assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
        else: assert unet.up_blocks[0].b1 == 1.2
    ends_equal(base, tuned, comb)
    if which == "freeu":
        comb.disable_freeu()
        for unet in (comb.original_unet, comb.fine_tuned_unet):
            assert not hasattr(unet.up_blocks[0], "b1") or unet.up_blocks[0].b1 is None


def test_dtype_and_attention_processors_reach_both_models(sd):
    base, tuned, comb = (copy.deepcopy(p) for p in sd)
    from diffusers.models.attention_processor import AttnProcessor
    comb.unet.set_attn_processor(AttnProcessor())
    assert all(isinstance(p, AttnProcessor) for m in (comb.original_unet, comb.fine_tuned_unet) for p in m.attn_processors.values())
    comb.unet.to(torch.bfloat16)
    assert comb.original_unet.dtype == comb.fine_tuned_unet.dtype == torch.bfloat16
    comb.to(torch.float32)
    assert comb.fine_tuned_unet.dtype == torch.float32


def test_switching_denoiser_passes_for_the_model_and_refuses_assignment(sd):
    base, tuned, comb = sd
    assert isinstance(comb.unet, UNet2DConditionModel) and comb.unet.config is comb.original_unet.config
    assert set(comb.components) >= {"original_unet", "fine_tuned_unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert "unet" not in comb.components
    with pytest.raises(UserError, match="assign original_unet or fine_tuned_unet"): comb.unet = tuned.unet
    assert copy.deepcopy(comb).unet.config == comb.unet.config         # the pipeline copies with its denoiser


def test_aig_runs_through_the_stock_pipeline(sd):
    base, tuned, _ = sd
    aig = AIGStableDiffusionPipeline.from_pipelines(base, tuned.unet)
    seen = []
    run(aig, aig_power=1.0, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    assert seen == list(range(N))
    assert torch.equal(run(aig, aig_power=0), run(tuned, guidance_scale=1.0))


def test_sd3_prompts_clip_skip_and_skip_layer_guidance():
    base, tuned, comb = family(tiny_sd3_pipeline, "transformer")
    kw = dict(prompt_2=["a dog"] * 2, prompt_3=["a bird"] * 2, negative_prompt=["blurry"] * 2, negative_prompt_2=["dark"] * 2,
              negative_prompt_3=["noise"] * 2, clip_skip=1)
    assert torch.equal(run(comb, original_transformer_steps=N, **kw), run(base, **kw))
    assert torch.equal(run(comb, original_transformer_steps=0, fine_tuned_guidance_scale=3.0, **kw), run(tuned, guidance_scale=3.0, **kw))
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0)
    assert torch.equal(run(comb, original_transformer_steps=N, **slg), run(base, **slg))
    run(comb, original_transformer_steps=2, **slg)                      # the second call per step, on cond only


def test_pixart_timesteps_optional_text_encoder_and_mask_feature(tmp_path):
    base, tuned, comb = family(tiny_pixart_pipeline, "transformer", sched=None)
    kw = dict(use_resolution_binning=False)
    ts = [999, 600, 300, 50]
    assert torch.equal(run(comb, original_transformer_steps=N, timesteps=ts, **kw), run(base, timesteps=ts, **kw))
    run(comb, original_transformer_steps=2, mask_feature=True, **kw)     # deprecated argument: a warning, as stock
    embeds, mask, neg, neg_mask = comb.encode_prompt(PROMPT, True, device="cpu")
    lean = CombinedPixArtAlphaPipeline(**{**comb.components, "text_encoder": None, "tokenizer": None})
    lean.save_pretrained(tmp_path)
    back = CombinedPixArtAlphaPipeline.from_pretrained(tmp_path); back.set_progress_bar_config(disable=True)
    assert back.text_encoder is None
    g = lambda: torch.Generator().manual_seed(0)
    a = back(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=neg,
             negative_prompt_attention_mask=neg_mask,
             original_transformer_steps=2, num_inference_steps=N, generator=g(), output_type="pt", **kw).images
    b = comb(PROMPT, original_transformer_steps=2, num_inference_steps=N, generator=g(), output_type="pt", **kw).images
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model offloading needs an accelerator")
def test_model_cpu_offload(sd):
    base, tuned, comb = (copy.deepcopy(p) for p in sd)
    for p in (base, comb): p.enable_model_cpu_offload()
    torch.testing.assert_close(run(comb, original_unet_steps=N), run(base), atol=1e-5, rtol=0)
