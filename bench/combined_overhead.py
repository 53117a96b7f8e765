"""Overhead of combined generation: CombinedStableDiffusionPipeline with original_unet_steps == num_inference_steps
against StableDiffusionPipeline on the same components. The combined pipeline is StableDiffusionPipeline's own loop
with a switching denoiser, so what it adds is the switch's bookkeeping per denoiser call (target: ratio <= 1.01).

Method: one torch thread by default, a warm-up, many alternating pairs in ABBA order, the
median of the per-pair ratios (and its bootstrap-free spread: the interquartile range of the ratios).

    python bench/combined_overhead.py                 # tiny components on the CPU
    python bench/combined_overhead.py --sd15          # random SD1.5-size components, fp16 on CUDA (for a GPU run)
"""
from __future__ import annotations
import argparse, copy, os, platform, statistics, time
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel, AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel
from imagerefl.testing import tiny_sd_pipeline
from imagerefl.mini.components import clip_tokenizer, sd_scheduler
from imagerefl.sampling import CombinedStableDiffusionPipeline

# Stable Diffusion 1.5's UNet (stable-diffusion-v1-5/unet/config.json), written out so no hub access is needed.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                 "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
                 act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
# CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14), SD1.5's text encoder.
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
# SD's KL VAE (stable-diffusion-v1-5/vae/config.json).
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def sd15_pipeline(device, dtype, seed=0):
    "A StableDiffusionPipeline with SD1.5-size, randomly initialised components (no download)."
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sd_scheduler("ddim"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sd15", action="store_true", help="random SD1.5-size components (fp16 on CUDA); default: tiny")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available with --sd15, else cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    ap.add_argument("--pairs", type=int, default=40, help="ABBA pairs (each pair = one A and one B call)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per call")
    ap.add_argument("--resolution", type=int, default=None, help="image size (default: 64 tiny, 512 SD1.5)")
    ap.add_argument("--output-type", default="latent", help="'latent' times the denoising loop only; 'pt' adds decoding")
    ap.add_argument("--construct-only", action="store_true", help="build the pipelines, print their sizes, and stop")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if a.sd15 and torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if (a.sd15 and device.type == "cuda") else torch.float32
    if a.sd15:
        base, res = sd15_pipeline(device, dtype), a.resolution or 512
    else:
        base, res = tiny_sd_pipeline(0).to(device), a.resolution or 64
    # a real two-UNet pipeline (a --construct-only check shares the UNet to spare memory)
    tuned_unet = base.unet if a.construct_only else copy.deepcopy(base.unet)
    comb = CombinedStableDiffusionPipeline.from_pipelines(base, tuned_unet)
    n_unet = sum(p.numel() for p in base.unet.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    rows = [("device", f"{device.type}: {dev_name}"), ("torch", torch.__version__), ("torch threads", torch.get_num_threads()),
            ("components", f"{'SD1.5-size random' if a.sd15 else 'tiny'}, {dtype}, UNet {n_unet/1e6:.2f} M params"),
            ("sizes", f"batch {a.batch}, {res}x{res} px, latents {res // base.vae_scale_factor}, {a.steps} DDIM steps, CFG 7.5"),
            ("output_type", a.output_type)]
    if a.construct_only:
        for k, v in rows: print(f"| {k} | {v} |")
        return
    prompts = ["a photo of a cat"] * a.batch
    def sync():
        if device.type == "cuda": torch.cuda.synchronize(device)
    def run(pipe, **kw):
        g = torch.Generator(device).manual_seed(0)
        sync(); t0 = time.perf_counter()
        pipe(prompts, num_inference_steps=a.steps, height=res, width=res, generator=g, output_type=a.output_type, **kw)
        sync(); return time.perf_counter() - t0
    A = lambda: run(base)                                                    # StableDiffusionPipeline
    B = lambda: run(comb, original_unet_steps=a.steps)                       # combined, all steps on the base UNet
    for _ in range(3): A(); B()                                              # warm-up
    ta, tb, ratios = [], [], []
    for i in range(a.pairs):
        if i % 2 == 0: x = A(); y = B()
        else: y = B(); x = A()
        ta.append(x); tb.append(y); ratios.append(y / x)
    q = statistics.quantiles(ratios, n=4)
    rows += [("pairs (ABBA)", a.pairs), ("median time StableDiffusionPipeline", f"{statistics.median(ta)*1e3:.1f} ms"),
             ("median time Combined (k = N)", f"{statistics.median(tb)*1e3:.1f} ms"),
             ("median per-pair ratio Combined / SD", f"{statistics.median(ratios):.4f}"),
             ("ratio interquartile range", f"{q[0]:.4f} .. {q[2]:.4f}")]
    ratio = statistics.median(ratios)
    rows.append(("target: ratio <= 1.01", "met" if ratio <= 1.01 else "NOT met"))
    print("| quantity | value |\n| --- | --- |")
    for k, v in rows: print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
