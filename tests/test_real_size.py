"""The real-size path on the CPU: Stable Diffusion 1.5-size components with random weights (UNet, VAE and CLIP ViT-L
text encoder from their published configs, written in code in bench/train_step.py) and HPSv2.1's ViT-H-14 reward, at a
reduced resolution. What tiny components hide shows here: attention head sizes, the reward's resize to 224, text
length 77, LoRA with gradient checkpointing on the real block layout.

Precision: fp32 always. bf16 (frozen parts in bf16, the adapter in fp32) only on a CPU with bf16 instructions
(AVX512-BF16 or AMX) or when IMAGEREFL_BF16=1: elsewhere torch emulates bf16 matmuls about 100x slower than fp32
(measured on a 2-core AMD EPYC without them: 0.4 against 41.6 GFLOP/s), and one ViT-H-14 forward alone would take
minutes. The bf16 casts are tested with tiny components in the quick suite and at this size on a GPU by bench/gpu.py.

Slow (minutes, peak RSS about 17 GB): python -m pytest -m slow tests/test_real_size.py -s
"""
import copy, os, resource, sys, time
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow      # SD1.5-size UNet/VAE/CLIP-L and ViT-H-14 on the CPU (minutes, ~17 GB)
RES, N = 64, 3            # 64 px (8x8 latents: every UNet level still runs, down to 1x1), 3 sampling steps


def fast_bf16()->bool:
    "Whether this CPU multiplies bf16 natively (else torch emulates it, about 100x slower than fp32)."
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return os.environ.get("IMAGEREFL_BF16") == "1" or "avx512_bf16" in flags or "amx_bf16" in flags

PRECISIONS = ["no", pytest.param("bf16", marks=pytest.mark.skipif(not fast_bf16(),
              reason="this CPU has no bf16 instructions: emulated bf16 is ~100x slower than fp32 (IMAGEREFL_BF16=1 forces it)"))]


def peak_gib(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.fixture(scope="module")
def parts():
    sys.path.insert(0, str(ROOT/"bench"))
    import train_step as ts
    torch.manual_seed(0)
    pipe, reward = ts.sd15_pipeline(), ts.hps_reward(True)
    pipe.set_progress_bar_config(disable=True)
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"\nSD1.5-size: UNet {n(pipe.unet):.0f} M, VAE {n(pipe.vae):.0f} M, text encoder {n(pipe.text_encoder):.0f} M, "
          f"ViT-H-14 reward {n(reward):.0f} M params; peak RSS {peak_gib():.1f} GiB")
    assert pipe.unet.config.attention_head_dim == 8 and pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.tokenizer.model_max_length == 77 and reward.size == 224
    return pipe, reward


def own_copy(pipe, precision:str):
    "A pipeline for one test: its own UNet (LoRA is added to it); in fp32 the frozen parts are shared (nothing casts them),\n"\
    "in bf16 they are copied too (the trainer casts them). Deep-copying everything at this size would hold ~17 GB."
    if precision == "bf16": return copy.deepcopy(pipe)
    return type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)}, requires_safety_checker=False)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", ["imagerefl", "refl", "draftk"])
def test_lora_step_with_checkpointing_and_validation(parts, name, precision, tmp_path):
    """One optimizer step (LoRA, gradient checkpointing, frozen parts in `precision`, fp32 adapter), then a validation
    pass whose combined generation switches the LoRA off and on."""
    from imagerefl.train import Trainer
    from imagerefl.data import PromptDataset
    from imagerefl.config import load_config
    from imagerefl.diffusion import Backbone
    from imagerefl.objectives import make_objective
    from imagerefl.data import ImageCaptionDataset
    pipe, reward = parts
    obj = make_objective(name, dict(refl=dict(num_inference_steps=N, min_mid_index=N - 2, max_mid_index=N),
                                    imagerefl=dict(num_inference_steps=N, start_index=N - 2, min_mid_index=N - 2, max_mid_index=N),
                                    draftk=dict(num_inference_steps=N, k=1))[name])
    cfg = load_config(dict(out_dir=str(tmp_path/"run"), mixed_precision=precision, log_with="none", export=False, checkpoint_every=0,
                           max_steps=1, batch_size=1, gradient_accumulation_steps=1,
                           validation=dict(every=1, num_inference_steps=N, original_unet_steps=N // 2, images_per_prompt=2, batch_size=2),
                           model=dict(scheduler="ddim", gradient_checkpointing=True, lora_rank=4), objective=dict(name=name)))
    bb = Backbone(own_copy(pipe, precision), scheduler="ddim", num_inference_steps=N, resolution=RES)
    prompts = ["a photo of a red bicycle leaning on a brick wall", "an oil painting of a lighthouse in a storm, " * 6]  # > 77 tokens
    data = (ImageCaptionDataset(list(torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0))), prompts, RES)
            if obj.needs_images else PromptDataset(prompts))
    tr = Trainer(cfg, bb, obj, copy.deepcopy(reward) if precision == "bf16" else reward, data, val_prompts=prompts[:1])
    frozen = torch.bfloat16 if precision == "bf16" else torch.float32
    assert tr.frozen_dtype == frozen and bb.vae.dtype == frozen and bb.pipe.text_encoder.dtype == frozen
    assert next(tr.reward.parameters()).dtype == frozen
    lora = {n: p.detach().clone() for n, p in bb.unet.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for n, p in bb.unet.named_parameters() if p.requires_grad)
    t = time.time(); logs = tr.update(); dt = time.time() - t
    assert logs is not None and all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values() if isinstance(v, (int, float)))
    moved = max((p.detach() - lora[n]).abs().max().item() for n, p in bb.unet.named_parameters() if p.requires_grad)
    assert moved > 0                                                       # the adapter was updated
    t = time.time(); val = tr.validate(); dv = time.time() - t
    assert set(val) >= {"val/reward_tuned", "val/reward_combined"} and all(v == v for v in val.values()), val
    print(f"\n{name} ({precision}): one LoRA step {dt:.0f} s, validation ({N} steps, tuned + combined with the LoRA switch, 2 images) "
          f"{dv:.0f} s; peak RSS {peak_gib():.1f} GiB")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_combined_generation_two_unets(parts, precision):
    "Combined generation with two SD1.5-size UNets for a few steps equals the base pipeline when the base runs all steps."
    from imagerefl.sampling import CombinedStableDiffusionPipeline
    from imagerefl.mini.components import sd_scheduler
    pipe, _ = parts
    base = copy.deepcopy(pipe).to(dtype=torch.bfloat16 if precision == "bf16" else torch.float32); base.scheduler = sd_scheduler("ddim")
    tuned = copy.deepcopy(base.unet)
    with torch.no_grad():
        for p in tuned.parameters(): p.add_(0.01 * torch.randn_like(p))
    comb = CombinedStableDiffusionPipeline.from_pipelines(base, tuned)
    kw = dict(num_inference_steps=N, height=RES, width=RES, output_type="pt")
    t = time.time()
    a = comb(["a photo of a cat"], original_unet_steps=N, generator=torch.Generator().manual_seed(0), **kw).images
    b = base(["a photo of a cat"], generator=torch.Generator().manual_seed(0), **kw).images
    c = comb(["a photo of a cat"], original_unet_steps=N // 2, generator=torch.Generator().manual_seed(0), **kw).images
    dt = (time.time() - t) / 3
    torch.testing.assert_close(a, b)
    assert c.isfinite().all() and (c - a).abs().max() > 0                   # the tuned UNet ran the late steps
    print(f"\ncombined generation, two SD1.5-size UNets ({precision}), {N} steps at {RES} px: {dt:.0f} s per call; peak RSS {peak_gib():.1f} GiB")
