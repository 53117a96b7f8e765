"Parity, persistence and fault tests for imagerefl.sampling: combined generation and AIG against diffusers' own pipelines."
import json, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path
import pytest, torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from imagerefl.core import UserError
from imagerefl.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from imagerefl.sampling import (CombinedStableDiffusionPipeline, CombinedStableDiffusionXLPipeline,
                                AIGStableDiffusionPipeline, AIGStableDiffusionXLPipeline, BaseStepsCache)
from imagerefl.sweeps import switch_sweep_images

PROMPT, N = ["a photo of a cat", "a red bicycle"], 4
LORA_FILE = "pytorch_lora_weights.safetensors"   # named: diffusers 0.39 and older need it offline


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny models run 5-10x faster with one torch thread on shared cores."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def with_unet(pipe, unet):
    "The same diffusers pipeline (text encoders, VAE, scheduler) with another UNet."
    kw = dict(requires_safety_checker=False) if isinstance(pipe, StableDiffusionPipeline) else dict(add_watermarker=False)
    p = type(pipe)(**{**pipe.components, "unet": unet}, **kw)
    p.set_progress_bar_config(disable=True)
    return p


def gen(pipe, seed=0, output_type="pt", **kw):
    return pipe(PROMPT, num_inference_steps=N, generator=torch.Generator().manual_seed(seed), output_type=output_type, **kw).images


def close(a, b, tol=1e-5): torch.testing.assert_close(a, b, atol=tol, rtol=0)


def one_line_user_error(f, contains):
    with pytest.raises(UserError) as e: f()
    assert contains in str(e.value) and "\n" not in str(e.value), str(e.value)


MAKERS = {"sd": (tiny_sd_pipeline, CombinedStableDiffusionPipeline, AIGStableDiffusionPipeline),
          "sdxl": (tiny_sdxl_pipeline, CombinedStableDiffusionXLPipeline, AIGStableDiffusionXLPipeline)}


def pipes(kind, sched):
    make, comb_cls, aig_cls = MAKERS[kind]
    base = make(0, sched)
    tuned = with_unet(base, make(1, sched).unet)
    return base, tuned, comb_cls.from_pipelines(base, tuned.unet), aig_cls.from_pipelines(base, tuned.unet)


@pytest.mark.parametrize("kind,sched", [("sd", "ddim"), ("sd", "ddpm"), ("sd", "euler"), ("sd", "dpm"),
                                        ("sdxl", "ddim"), ("sdxl", "ddpm")])
def test_end_points_equal_diffusers(kind, sched):
    base, tuned, comb, aig = pipes(kind, sched)
    img_base, img_tuned = gen(base), gen(tuned, guidance_scale=1.0)
    close(gen(comb, original_unet_steps=N), img_base)                                   # base UNet, its default CFG
    close(gen(comb, original_unet_steps=0), img_tuned)                                  # tuned UNet, no CFG
    close(gen(comb, original_unet_steps=0, fine_tuned_guidance_scale=4.0), gen(tuned, guidance_scale=4.0))
    close(gen(aig, aig_power=0), img_tuned)                                             # AIG, w = 1 everywhere
    if sched in ("ddim", "ddpm"): close(gen(aig, aig_power=1e9), gen(base, guidance_scale=1.0))   # AIG, w = 0
    mid = gen(comb, original_unet_steps=N // 2)
    assert (mid - img_base).abs().max() > 1e-3 and (mid - img_tuned).abs().max() > 1e-3


def test_stochastic_noise_is_shared_across_switch_points():
    # DDPM draws fresh noise each step from the generator: with all steps on one UNet, a different seed must differ
    base, tuned, comb, _ = pipes("sd", "ddpm")
    assert (gen(comb, seed=0, original_unet_steps=2) - gen(comb, seed=1, original_unet_steps=2)).abs().max() > 1e-2


@pytest.mark.parametrize("kind,sched", [("sd", "ddim"), ("sd", "ddpm"), ("sd", "euler"), ("sd", "dpm"), ("sdxl", "ddpm")])
def test_shared_base_steps_give_the_same_images(kind, sched):
    "A sweep over switch points with a `BaseStepsCache` gives every image bit for bit, and runs each base step once."
    base, tuned, comb, _ = pipes(kind, sched)
    make, comb_cls, _ = MAKERS[kind]
    shared = comb_cls.from_pipelines(base, tuned.unet, base_steps_cache=BaseStepsCache())
    calls = []
    hook = base.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    # one generator per image, as `evaluate` passes them; the base model alone (k = N) first, then the switch points
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]
    run = lambda p, k: p(PROMPT, num_inference_steps=N, generator=gens(), output_type="pt", original_unet_steps=k).images
    plain = {k: run(comb, k) for k in (N, 1, 3, 2)}
    calls.clear()
    for k in (N, 1, 3, 2): assert torch.equal(run(shared, k), plain[k]), k
    hook.remove()
    assert len(calls) == N and shared.base_steps_cache.steps_reused == 1 + 3 + 2


def test_shared_base_steps_lora_form_and_sweep(tmp_path):
    "The LoRA form shares its base steps too (adapter off), and `switch_sweep_images` shares them by default."
    one = tiny_sd_pipeline(0, "ddpm")
    _random_lora(one)
    plain = CombinedStableDiffusionPipeline.from_pipelines(one)
    shared = CombinedStableDiffusionPipeline.from_pipelines(one, base_steps_cache=BaseStepsCache())
    for k in (N, 2, 0, 3): assert torch.equal(gen(shared, original_unet_steps=k), gen(plain, original_unet_steps=k)), k
    assert shared.base_steps_cache.steps_reused == 2 + 3
    sw = switch_sweep_images(plain, PROMPT, [2, 3, N], num_inference_steps=N, output_type="pt")
    for k, im in sw.items(): assert torch.equal(im, gen(plain, original_unet_steps=k)), k
    assert plain.base_steps_cache is None                                  # the sweep's own cache is gone afterwards


def test_shared_base_steps_follow_what_the_call_does():
    "A step callback that changes the latents, or the global RNG, gives other inputs: the cache still gives every step's result."
    base, tuned, comb, _ = pipes("sd", "ddpm")
    shared = CombinedStableDiffusionPipeline.from_pipelines(base, tuned.unet, base_steps_cache=BaseStepsCache())
    def nudge(p, i, t, kw): kw["latents"] = kw["latents"] * 0.9; return kw
    for k in (N, 2):
        a = shared(PROMPT, num_inference_steps=N, original_unet_steps=k, output_type="pt", generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=nudge).images
        b = comb(PROMPT, num_inference_steps=N, original_unet_steps=k, output_type="pt", generator=torch.Generator().manual_seed(0),
                 callback_on_step_end=nudge).images
        assert torch.equal(a, b), k
        torch.manual_seed(5); a = shared(PROMPT, num_inference_steps=N, original_unet_steps=k, output_type="pt").images   # global RNG
        torch.manual_seed(5); b = comb(PROMPT, num_inference_steps=N, original_unet_steps=k, output_type="pt").images
        assert torch.equal(a, b), k
    assert shared.base_steps_cache.steps_reused > 0


def test_negative_prompt_encoded_only_when_a_phase_uses_cfg(monkeypatch):
    _, _, comb, aig = pipes("sd", "ddim")
    seen = []
    orig = CombinedStableDiffusionPipeline.encode_prompt
    def spy(self, prompt, device, n, do_cfg, *a, **kw):
        seen.append(do_cfg); return orig(self, prompt, device, n, do_cfg, *a, **kw)
    monkeypatch.setattr(CombinedStableDiffusionPipeline, "encode_prompt", spy)
    gen(comb, original_unet_steps=0); gen(comb, original_unet_steps=2); gen(comb, original_unet_steps=N, guidance_scale=1.0)
    gen(comb, original_unet_steps=0, fine_tuned_guidance_scale=2.0); gen(aig); gen(aig, guidance_scale=3.0)
    assert seen == [False, True, False, True, False, True]


@pytest.mark.parametrize("bad", [N + 1, -1, 1.5, "3"])
def test_bad_original_unet_steps_refused_before_any_work(monkeypatch, bad):
    _, _, comb, _ = pipes("sd", "ddim")
    def boom(*a, **kw): raise AssertionError("work was done before the check")
    monkeypatch.setattr(comb.text_encoder, "forward", boom)
    monkeypatch.setattr(comb.original_unet, "forward", boom)
    one_line_user_error(lambda: comb("a cat", num_inference_steps=N, original_unet_steps=bad), "outside the schedule")
    _, _, combxl, aigxl = pipes("sdxl", "ddim")
    monkeypatch.setattr(combxl.text_encoder, "forward", boom)
    one_line_user_error(lambda: combxl("a cat", num_inference_steps=N, original_unet_steps=bad), "outside the schedule")
    one_line_user_error(lambda: aigxl("a cat", num_inference_steps=N, aig_power=-2), "aig_power")


def test_default_switch_point_is_the_authors_recommendation():
    _, _, comb, _ = pipes("sd", "ddpm")
    close(gen(comb), gen(comb, original_unet_steps=3))            # 3/4 of 4 steps


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_save_load_round_trip(tmp_path, kind):
    base, tuned, comb, aig = pipes(kind, "ddpm")
    comb.save_pretrained(tmp_path)
    idx = json.loads((tmp_path/"model_index.json").read_text())
    assert idx["_class_name"] == type(comb).__name__ and idx["original_unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path/"fine_tuned_unet"/"diffusion_pytorch_model.safetensors").exists()
    back = type(comb).from_pretrained(tmp_path); back.set_progress_bar_config(disable=True)
    # latents bitwise; decoded images to the last bit only: the VAE's CPU kernels take another vector path on the
    # differently aligned weights of a memory-mapped safetensors file (measured: 6e-7)
    assert torch.equal(gen(back, original_unet_steps=2, output_type="latent"), gen(comb, original_unet_steps=2, output_type="latent"))
    close(gen(back, original_unet_steps=2), gen(comb, original_unet_steps=2), 1e-5)
    back_aig = type(aig).from_pretrained(tmp_path); back_aig.set_progress_bar_config(disable=True)
    assert torch.equal(gen(back_aig, aig_power=1.5, output_type="latent"), gen(aig, aig_power=1.5, output_type="latent"))


def test_authors_layout_loads_without_remote_code(tmp_path):
    _, _, comb, _ = pipes("sd", "ddim")
    comb.save_pretrained(tmp_path)
    idx = json.loads((tmp_path/"model_index.json").read_text())
    idx.update(_class_name=["pipeline", "ImageReFLPipeline"], safety_checker=[None, None], requires_safety_checker=False)
    (tmp_path/"model_index.json").write_text(json.dumps(idx))
    (tmp_path/"pipeline.py").write_text("raise RuntimeError('remote code was executed')\n")
    back = CombinedStableDiffusionPipeline.from_pretrained(tmp_path); back.set_progress_bar_config(disable=True)
    assert type(back) is CombinedStableDiffusionPipeline
    assert torch.equal(gen(back, original_unet_steps=2, output_type="latent"), gen(comb, original_unet_steps=2, output_type="latent"))


def test_fine_tuned_unet_from_folder_and_mismatch(tmp_path):
    base, tuned, comb, _ = pipes("sd", "ddim")
    tuned.unet.save_pretrained(tmp_path/"unet")
    from_dir = CombinedStableDiffusionPipeline.from_pipelines(base, tmp_path/"unet")
    assert torch.equal(gen(from_dir, original_unet_steps=1, output_type="latent"), gen(comb, original_unet_steps=1, output_type="latent"))
    one_line_user_error(lambda: CombinedStableDiffusionPipeline.from_pipelines(base, tmp_path/"nope"), "does not exist")
    one_line_user_error(lambda: CombinedStableDiffusionPipeline.from_pipelines(base, tiny_sdxl_pipeline().unet), "does not match")
    one_line_user_error(lambda: CombinedStableDiffusionXLPipeline.from_pipelines(base, tuned.unet), "StableDiffusionXLPipeline")


def _random_lora(pipe, seed=7):
    from peft import LoraConfig
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n: p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)   # peft starts B at 0


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_form_equals_two_unets_with_merged_weights(tmp_path, kind):
    make, comb_cls, aig_cls = MAKERS[kind]
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers
    trained = make(0, "ddpm"); _random_lora(trained)
    type(trained).save_lora_weights(tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(trained.unet)))
    # LoRA form: one UNet, the adapter loaded from the diffusers LoRA file
    one = comb_cls.from_pipelines(make(0, "ddpm")); one.load_lora_weights(tmp_path, weight_name=LORA_FILE, adapter_name="fine_tuned")
    assert one.fine_tuned_unet is None
    # two-UNet form: a separate copy with the LoRA fused into its weights
    merged = make(0, "ddpm"); merged.load_lora_weights(tmp_path, weight_name=LORA_FILE); merged.fuse_lora(); merged.unload_lora_weights()
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    two = comb_cls.from_pipelines(make(0, "ddpm"), merged.unet)
    for k in (0, 2): close(gen(one, original_unet_steps=k), gen(two, original_unet_steps=k), 1e-4)
    assert (gen(one, original_unet_steps=0) - gen(two, original_unet_steps=N)).abs().max() > 1e-3   # the adapter matters
    aig1, aig2 = aig_cls.from_pipelines(make(0, "ddpm")), aig_cls.from_pipelines(make(0, "ddpm"), merged.unet)
    aig1.load_lora_weights(tmp_path, weight_name=LORA_FILE)
    close(gen(aig1, aig_power=1.5), gen(aig2, aig_power=1.5), 1e-4)
    # after a call the adapter is on again, so the base pipeline sharing the UNet still sees the tuned model
    assert all(not getattr(m, "disable_adapters", False) for m in one.original_unet.modules() if hasattr(m, "lora_A"))


def test_lora_form_refusals(tmp_path):
    plain = CombinedStableDiffusionPipeline.from_pipelines(tiny_sd_pipeline(0))
    one_line_user_error(lambda: gen(plain), "load_lora_weights")
    pipe = tiny_sd_pipeline(0); _random_lora(pipe)
    one = CombinedStableDiffusionPipeline.from_pipelines(pipe)
    one_line_user_error(lambda: one.save_pretrained(tmp_path), "save_lora_weights")
