"""Time one training step and its peak memory, for each objective, reference-like vs ours, in one run.

reference-like (the authors' loop, https://imagerefl.github.io/imagerefl/deviations.html): fp32 UNet weights under bf16 autocast, frozen parts
fp32, no gradient checkpointing, the training reward plus three validation-size rewards resident on the device.
ours: bf16 autocast with the frozen VAE/text encoder/reward in bf16, gradient checkpointing (UNet, VAE decoder),
only the training reward resident; full UNet, and LoRA (rank 8).

    python bench/train_step.py                 # tiny components (CPU or GPU), seconds
    python bench/train_step.py --sd15          # SD1.5-size UNet/VAE/CLIP-L text encoder, HPSv2.1 ViT-H-14, random
                                               # weights, 512 px, batch 8 (GPU; about 40 GB for reference-like)
Peak memory is torch.cuda.max_memory_allocated per configuration (n/a on the CPU).
"""
from __future__ import annotations
import argparse, gc, os, sys, tempfile, time
import torch

def sd15_pipeline():
    "A Stable Diffusion 1.5-size pipeline with random weights (configs of the SD1.5 checkpoint)."
    from diffusers import AutoencoderKL, UNet2DConditionModel, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel
    from imagerefl.mini.components import clip_tokenizer, sd_scheduler
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
        num_hidden_layers=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407))
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet, scheduler=sd_scheduler("ddpm"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)

def hps_reward(sd15:bool):
    "HPSv2.1's reward module (open_clip ViT-H-14, or a tiny open_clip) with random weights."
    import open_clip
    from imagerefl.rewards import OpenCLIPReward, open_clip_model
    arch = "ViT-H-14" if sd15 else dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
                                        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
    model, tok = open_clip_model(arch)
    size = 224 if sd15 else 32
    return OpenCLIPReward(model, tok, size=size).requires_grad_(False).eval()

def objective(name:str, sd15:bool):
    from imagerefl.objectives import make_objective
    n = 40 if sd15 else 8
    cfg = dict(refl=dict(num_inference_steps=n, min_mid_index=n * 3 // 4, max_mid_index=n),
               imagerefl=dict(num_inference_steps=n, start_index=n * 3 // 4, max_mid_index=n, min_mid_index=n * 3 // 4),
               draftk=dict(num_inference_steps=n * 31 // 40, k=1))[name]
    return make_objective(name, cfg)

def run(name:str, setup:str, sd15:bool, batch:int, steps:int, out:str)->dict:
    from imagerefl.train import Trainer
    from imagerefl.data import PromptDataset
    from imagerefl.config import load_config
    from imagerefl.diffusion import Backbone
    from imagerefl.testing import tiny_sd_pipeline
    cuda = torch.cuda.is_available()
    pipe = sd15_pipeline() if sd15 else tiny_sd_pipeline(resolution=64)
    ref = setup == "reference-like"
    cfg = load_config(dict(out_dir=out, mixed_precision="bf16", log_with="none", export=False, checkpoint_every=0, max_steps=10**6,
                           batch_size=batch, gradient_accumulation_steps=1, validation=dict(every=0),
                           model=dict(scheduler="ddpm", gradient_checkpointing=not ref, frozen_dtype="fp32" if ref else "auto",
                                      lora_rank=8 if setup == "ours-lora" else 0),
                           objective=dict(name=name)))
    obj = objective(name, sd15)
    bb = Backbone(pipe, scheduler="ddpm", num_inference_steps=obj.config.num_inference_steps)
    res = bb.resolution
    reward = hps_reward(sd15)
    resident = [hps_reward(sd15).to(bb.device if not cuda else "cuda") for _ in range(3)] if ref else []  # validation rewards the authors kept on the GPU
    g = torch.Generator().manual_seed(0)
    n = batch * (steps + 2)
    prompts = [f"a photo of object {i}" for i in range(n)]
    if obj.needs_images:
        from imagerefl.data import ImageCaptionDataset
        data = ImageCaptionDataset(list(torch.rand(n, 3, res, res, generator=g)), prompts, res)
    else: data = PromptDataset(prompts)
    tr = Trainer(cfg, bb, obj, reward, data)
    if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    tr.update()                                      # warm-up
    if cuda: torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps): tr.update()
    if cuda: torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del tr, bb, pipe, reward, resident; gc.collect()
    if cuda: torch.cuda.empty_cache()
    return dict(objective=name, setup=setup, step_s=dt, peak_gib=peak)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sd15", action="store_true", help="SD1.5-size components, 512 px, HPSv2.1 ViT-H-14 (random weights)")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 8 with --sd15, 2 otherwise)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--objectives", default="imagerefl,refl,draftk")
    ap.add_argument("--build-only", action="store_true", help="construct the components and stop (a cheap check)")
    a = ap.parse_args(argv)
    batch = a.batch or (8 if a.sd15 else 2)
    if a.build_only:
        p = sd15_pipeline() if a.sd15 else None; r = hps_reward(a.sd15)
        if p is not None: print("unet params", sum(x.numel() for x in p.unet.parameters()) / 1e6, "M")
        print("reward params", sum(x.numel() for x in r.parameters()) / 1e6, "M"); return
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.objectives.split(","):
            for setup in ("reference-like", "ours-full", "ours-lora"):
                rows.append(run(name, setup, a.sd15, batch, a.steps, f"{d}/{name}-{setup}"))
                print(rows[-1], file=sys.stderr, flush=True)
    print(f"\ntraining step, {'SD1.5-size 512 px' if a.sd15 else 'tiny components 64 px'}, batch {batch}, on {dev}")
    print(f"{'objective':<10} {'setup':<15} {'s/step':>8} {'speed-up':>9} {'peak GiB':>9}")
    for r in rows:
        base = next(x for x in rows if x["objective"] == r["objective"] and x["setup"] == "reference-like")
        print(f"{r['objective']:<10} {r['setup']:<15} {r['step_s']:>8.3f} {base['step_s'] / r['step_s']:>8.2f}x {r['peak_gib']:>9.2f}")

if __name__ == "__main__": main()
