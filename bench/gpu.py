"""Everything a GPU day needs, in one run on one CUDA GPU with random weights (under 8 minutes on a large card):

1. checks that every GPU path runs: bf16 autocast (forward and backward), fp16 sampling, SDPA attention (equal to the
   plain attention), gradient checkpointing (equal gradients), 8-bit Adam (when bitsandbytes is installed);
2. the training step of each objective (ImageReFL, ReFL, DRaFT-K) at SD1.5 size, 512 px, batch 8, HPSv2.1's ViT-H-14
   reward: the reference-like setup of `bench/train_step.py` (fp32 frozen parts, no checkpointing, three validation
   rewards resident), ours with the full UNet, ours with LoRA; time per step and peak memory;
3. combined generation's time against `StableDiffusionPipeline` at SD1.5 size (fp16, 512 px; ABBA pairs, median ratio);
4. PixArt-α and SD3 at the real size of their transformers (PixArt-XL-2 0.6 B, SD3 medium 2 B; small text encoders
   and VAE, bench/transformers_size.py): one LoRA ImageReFL step (bf16 autocast, gradient checkpointing, 512 px,
   batch 2) and combined generation against `PixArtAlphaPipeline` / `StableDiffusion3Pipeline` (bf16);

and writes one markdown table (`bench/results/gpu.md`) with the card's name beside every figure. A broken path fails
the run (exit 1, the table says which); a configuration that does not fit in memory is reported as such.

    python bench/gpu.py                          # on a CUDA GPU
    python bench/gpu.py --cpu-rehearsal --out /tmp/gpu.md   # the same code, tiny components, on the CPU (CI runs it)
"""
from __future__ import annotations
import argparse, copy, gc, platform, statistics, sys, tempfile, time, traceback
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import train_step as ts                                   # the reference-like vs ours setups, the SD1.5-size builders

OBJECTIVES, SETUPS = ("imagerefl", "refl", "draftk"), ("reference-like", "ours-full", "ours-lora")


class Run:
    "Where and at what size the bench runs, and what it found."
    def __init__(self, rehearsal:bool):
        self.rehearsal = rehearsal
        self.device = torch.device("cpu" if rehearsal else "cuda")
        self.card = (f"CPU rehearsal ({platform.machine()}, {torch.get_num_threads()} threads)" if rehearsal
                     else torch.cuda.get_device_name(self.device))
        self.batch, self.res = (2, 32) if rehearsal else (8, 512)
        # on the CPU, bf16 convolutions are emulated and slow: the rehearsal trains in fp32 (bf16 is still checked)
        self.precision = "no" if rehearsal else "bf16"
        self.rows, self.failed, self.t0 = [], [], time.time()

    def sync(self):
        if self.device.type == "cuda": torch.cuda.synchronize(self.device)

    def add(self, part:str, what:str, value:str, ok:bool=True):
        self.rows.append((part, what, value)); print(f"[{time.time() - self.t0:6.0f} s] {part} | {what} | {value}", flush=True)
        if not ok: self.failed.append(f"{part}: {what}")

    def check(self, what:str, fn):
        "Run one GPU-path check; an exception or a false result is a failure, reported in the table."
        try:
            detail = fn()
            self.add("check", what, f"ok ({detail})" if detail else "ok")
        except Skip as e: self.add("check", what, f"not run: {e}")
        except Exception as e:
            traceback.print_exc()
            self.add("check", what, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", ok=False)


class Skip(Exception): "A check whose optional dependency is absent (reported, never silent)."


def pristine(run:Run):
    "The pipeline and reward every configuration copies (random weights, built once, on the CPU)."
    from imagerefl.testing import tiny_sd_pipeline
    with torch.random.fork_rng(devices=[]):                  # the caller's RNG is left as it was
        torch.manual_seed(0)
        pipe = tiny_sd_pipeline(resolution=32) if run.rehearsal else ts.sd15_pipeline()
        reward = ts.hps_reward(not run.rehearsal)
    pipe.set_progress_bar_config(disable=True)
    return pipe, reward


# ---- 1. GPU paths ------------------------------------------------------------------------------------------------
def unet_inputs(run:Run, unet, batch:int=2):
    g = torch.Generator().manual_seed(0)
    lat = run.res // 8 if not run.rehearsal else unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, lat, lat, generator=g).to(run.device)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(run.device)
    return x, torch.tensor([500] * batch, device=run.device), ctx

def check_bf16_autocast(run:Run, pipe):
    unet = copy.deepcopy(pipe.unet).to(run.device).train()
    x, t, ctx = unet_inputs(run, unet)
    with torch.autocast(run.device.type, dtype=torch.bfloat16):
        out = unet(x, t, ctx).sample
    assert out.dtype == torch.bfloat16, f"autocast output is {out.dtype}"
    out.float().pow(2).mean().backward()
    g = [p.grad for p in unet.parameters() if p.grad is not None]
    assert g and all(v.dtype == torch.float32 and v.isfinite().all() for v in g), "non-finite or missing fp32 gradients"
    return f"UNet forward+backward, {len(g)} fp32 grads finite"

def check_fp16_sampling(run:Run, pipe):
    p = copy.deepcopy(pipe).to(run.device, torch.float16)
    im = p(["a photo of a cat"], num_inference_steps=4, height=run.res, width=run.res, output_type="pt",
           generator=torch.Generator().manual_seed(0)).images
    assert im.isfinite().all() and im.std() > 0, "fp16 sampling gave non-finite or constant images"
    return f"4 steps at {run.res} px, finite"

def check_sdpa(run:Run, pipe):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    unet = copy.deepcopy(pipe.unet).to(run.device).eval()
    x, t, ctx = unet_inputs(run, unet)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0()); a = unet(x, t, ctx).sample
        unet.set_attn_processor(AttnProcessor()); b = unet(x, t, ctx).sample
    rel = float((a - b).abs().max() / b.abs().max())
    assert rel < 1e-3, f"SDPA differs from plain attention by {rel:.2e} (relative)"
    return f"equal to plain attention, max rel. diff {rel:.1e}"

def check_checkpointing(run:Run, pipe):
    grads = []
    for ckpt in (False, True):
        unet = copy.deepcopy(pipe.unet).to(run.device).train()
        if ckpt: unet.enable_gradient_checkpointing()
        x, t, ctx = unet_inputs(run, unet)
        unet(x, t, ctx).sample.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
        del unet
    rel = float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())
    assert rel < 1e-3, f"gradients with checkpointing differ by {rel:.2e} (relative)"
    return f"same gradients, max rel. diff {rel:.1e}"

def check_adam8bit(run:Run, pipe):
    try: import bitsandbytes  # noqa: F401
    except ImportError: raise Skip("bitsandbytes is not installed")
    if run.device.type != "cuda": raise Skip("bitsandbytes' 8-bit Adam needs CUDA")
    from imagerefl.train import make_optimizer
    from imagerefl.config import OptimizerConfig
    lin = torch.nn.Linear(4096, 4096, device=run.device)
    opt = make_optimizer(list(lin.parameters()), OptimizerConfig(name="adamw8bit", lr=1e-3))
    before = lin.weight.detach().clone()
    lin(torch.randn(8, 4096, device=run.device)).pow(2).mean().backward(); opt.step()
    assert lin.weight.isfinite().all() and (lin.weight - before).abs().max() > 0, "8-bit Adam did not move the weights"
    return type(opt).__name__


# ---- 2. training step ----------------------------------------------------------------------------------------------
def train_step(run:Run, pipe, reward, name:str, setup:str, steps:int, out:str)->tuple[float, float]:
    "Seconds per optimizer step and peak memory (GiB; CUDA only) of one objective and setup (as bench/train_step.py)."
    from imagerefl.train import Trainer
    from imagerefl.data import PromptDataset
    from imagerefl.config import load_config
    from imagerefl.diffusion import Backbone
    ref = setup == "reference-like"
    cfg = load_config(dict(out_dir=out, mixed_precision=run.precision, log_with="none", export=False, checkpoint_every=0,
                           max_steps=10**6, batch_size=run.batch, gradient_accumulation_steps=1, validation=dict(every=0),
                           model=dict(scheduler="ddpm", gradient_checkpointing=not ref, frozen_dtype="fp32" if ref else "auto",
                                      lora_rank=8 if setup == "ours-lora" else 0),
                           objective=dict(name=name)))
    obj = ts.objective(name, not run.rehearsal)
    if run.device.type == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    bb = Backbone(copy.deepcopy(pipe).to(run.device), scheduler="ddpm", num_inference_steps=obj.config.num_inference_steps)
    resident = [copy.deepcopy(reward).to(run.device) for _ in range(3)] if ref else []   # the authors' validation rewards
    n, g = run.batch * (steps + 2), torch.Generator().manual_seed(0)
    prompts = [f"a photo of object {i}" for i in range(n)]
    if obj.needs_images:
        from imagerefl.data import ImageCaptionDataset
        data = ImageCaptionDataset(list(torch.rand(n, 3, bb.resolution, bb.resolution, generator=g)), prompts, bb.resolution)
    else: data = PromptDataset(prompts)
    tr = Trainer(cfg, bb, obj, copy.deepcopy(reward), data)
    tr.update(); run.sync()                                    # warm-up
    t = time.perf_counter()
    for _ in range(steps): tr.update()
    run.sync(); dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else float("nan")
    del tr, bb, resident; gc.collect()
    return dt, peak


def abba(A, B, pairs:int)->tuple[float, float, float]:
    "Time two callables in ABBA order after two warm-up rounds: median seconds of each and median ratio B/A."
    for _ in range(2): A(); B()
    ta, tb = [], []
    for i in range(pairs):
        if i % 2 == 0: ta.append(A()); tb.append(B())
        else: tb.append(B()); ta.append(A())
    return statistics.median(ta), statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb))


# ---- 3. combined generation against StableDiffusionPipeline --------------------------------------------------------
def generation_ratio(run:Run, pipe, steps:int, pairs:int)->tuple[float, float, float]:
    from imagerefl.sampling import CombinedStableDiffusionPipeline
    from imagerefl.mini.components import sd_scheduler
    dtype = torch.float32 if run.rehearsal else torch.float16
    base = copy.deepcopy(pipe).to(run.device, dtype); base.scheduler = sd_scheduler("ddim")
    comb = CombinedStableDiffusionPipeline.from_pipelines(base, copy.deepcopy(base.unet))
    def once(p, **kw):
        run.sync(); t = time.perf_counter()
        p(["a photo of a cat"], num_inference_steps=steps, height=run.res, width=run.res, output_type="latent",
          generator=torch.Generator().manual_seed(0), **kw)
        run.sync(); return time.perf_counter() - t
    A, B = (lambda: once(base)), (lambda: once(comb, original_unet_steps=steps))
    return abba(A, B, pairs)


# ---- 4. the diffusion transformers: PixArt-α and SD3 ---------------------------------------------------------------
FAMILIES = ("pixart", "sd3")

def transformer_pipeline(run:Run, family:str):
    "Tiny components in a rehearsal; else the real-size transformer with small text encoders and VAE (bench/transformers_size.py)."
    torch.manual_seed(0)
    if run.rehearsal:
        from imagerefl.testing import tiny_pixart_pipeline, tiny_sd3_pipeline
        return dict(pixart=tiny_pixart_pipeline, sd3=tiny_sd3_pipeline)[family]()
    import transformers_size as tsz
    return tsz.BUILDERS[family]()

def transformer_step(run:Run, pipe, family:str, steps:int)->tuple[float, float]:
    "Seconds per LoRA ImageReFL optimizer step (bf16 autocast on a GPU, gradient checkpointing) and peak memory (GiB)."
    from peft import LoraConfig
    import transformers_size as tsz
    from imagerefl.diffusion import Backbone
    from imagerefl.objectives import ImageReFL
    if run.device.type == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    bb = Backbone(copy.deepcopy(pipe).to(run.device), num_inference_steps=40, resolution=run.res).freeze(
        None if run.rehearsal else torch.bfloat16)
    bb.transformer.requires_grad_(False)
    r = 4 if run.rehearsal else 64
    bb.add_lora(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=tsz.LORA_TARGETS[family]))
    bb.enable_memory_savings()
    params = [p for p in bb.transformer.parameters() if p.requires_grad]
    opt, obj = torch.optim.AdamW(params, lr=1e-4), ImageReFL()
    b = 2
    batch = dict(caption=[f"a photo of object {i}" for i in range(b)], image=torch.rand(b, 3, run.res, run.res))
    reward = lambda images, prompts: images.mean((1, 2, 3))
    def step():
        opt.zero_grad()
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=not run.rehearsal):
            loss, _ = obj(bb, batch, reward)
        loss.backward(); opt.step()
        if not torch.isfinite(loss): raise RuntimeError(f"non-finite loss {loss.item()}")
    step(); run.sync()                                          # warm-up
    t = time.perf_counter()
    for _ in range(steps): step()
    run.sync(); dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else float("nan")
    del bb, opt; gc.collect()
    return dt, peak

def transformer_generation_ratio(run:Run, pipe, family:str, steps:int, pairs:int)->tuple[float, float, float]:
    "Combined generation (switch at the end) against the family's diffusers pipeline: median seconds and ratio (ABBA pairs)."
    from imagerefl.sampling import combined_class
    dtype = torch.float32 if run.rehearsal else torch.bfloat16
    base = copy.deepcopy(pipe).to(run.device, dtype); base.set_progress_bar_config(disable=True)
    comb = combined_class(base).from_pipelines(base, copy.deepcopy(base.transformer))
    extra = dict(use_resolution_binning=False) if family == "pixart" else {}
    def once(p, **kw):
        run.sync(); t = time.perf_counter()
        p(["a photo of a cat"], num_inference_steps=steps, height=run.res, width=run.res, output_type="latent",
          generator=torch.Generator().manual_seed(0), **extra, **kw)
        run.sync(); return time.perf_counter() - t
    A, B = (lambda: once(base)), (lambda: once(comb, original_transformer_steps=steps))
    out = abba(A, B, pairs)
    del base, comb; gc.collect()
    return out

def run_transformers(run:Run, families, steps:int, pairs:int):
    "Part 4: per family, one timed LoRA training step and the generation ratio; a failure is reported, not hidden."
    for family in families:
        try: pipe = transformer_pipeline(run, family)
        except Exception as e:
            traceback.print_exc(); run.add(family, "build", f"FAILED: {type(e).__name__}: {e}", ok=False); continue
        n = sum(p.numel() for p in pipe.transformer.parameters())
        what = f"ImageReFL step, LoRA, {run.res} px, batch 2, gradient checkpointing" + ("" if run.rehearsal else ", bf16 autocast")
        try:
            dt, peak = transformer_step(run, pipe, family, steps)
            run.add(family, what, f"{dt:.3f} s/step" + (f", peak {peak:.1f} GiB" if peak == peak else "") + f" (transformer {n/1e6:.1f} M params)")
        except torch.OutOfMemoryError:
            gc.collect(); torch.cuda.empty_cache(); run.add(family, what, "out of memory on this card")
        except Exception as e:
            traceback.print_exc(); run.add(family, what, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", ok=False)
        k = 4 if run.rehearsal else 20
        try:
            ta, tb, r = transformer_generation_ratio(run, pipe, family, k, pairs)
            run.add(family, f"combined (switch at the end) / diffusers pipeline, {k} steps, batch 1" + ("" if run.rehearsal else ", bf16"),
                    f"median ratio {r:.3f} ({tb*1e3:.0f} ms vs {ta*1e3:.0f} ms)")
        except Exception as e:
            traceback.print_exc(); run.add(family, "combined vs diffusers pipeline", f"FAILED: {type(e).__name__}: {e}", ok=False)
        del pipe; gc.collect()


def table(run:Run)->str:
    size = ("tiny components, 32 px, batch 2, training in fp32" if run.rehearsal
            else "SD1.5-size random weights, 512 px, batch 8, training under bf16 autocast")
    lines = [f"# bench/gpu.py on {run.card}", "",
             f"{size}; torch {torch.__version__}; total {time.time() - run.t0:.0f} s. "
             + ("**A CPU rehearsal: these are not GPU figures.**" if run.rehearsal else "Random weights; peak memory is "
                "`torch.cuda.max_memory_allocated` per configuration."), "",
             "| part | what | value | card |", "| --- | --- | --- | --- |"]
    lines += [f"| {p} | {w} | {v} | {run.card} |" for p, w, v in run.rows]
    return "\n".join(lines) + "\n"


def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-rehearsal", action="store_true", help="tiny components on the CPU: the same code, in seconds")
    ap.add_argument("--out", default=None, help="markdown file (default: bench/results/gpu.md on a GPU, none in a rehearsal)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per configuration (default 2; rehearsal 1)")
    ap.add_argument("--pairs", type=int, default=None, help="ABBA pairs for the generation ratio (default 10; rehearsal 4)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated; empty: no training steps")
    ap.add_argument("--families", default=",".join(FAMILIES), help="diffusion transformers to time (pixart, sd3), comma-separated; empty: none")
    a = ap.parse_args(argv)
    if not a.cpu_rehearsal and not torch.cuda.is_available():
        print("bench/gpu.py: error: no CUDA GPU is visible; run it on a GPU, or rehearse with --cpu-rehearsal", file=sys.stderr)
        return 2
    run = Run(a.cpu_rehearsal)
    steps, pairs = a.steps or (1 if run.rehearsal else 2), a.pairs or (4 if run.rehearsal else 10)
    out = a.out or (None if run.rehearsal else str(Path(__file__).resolve().parent/"results"/"gpu.md"))
    pipe, reward = pristine(run)
    run.add("setup", "components", f"UNet {sum(p.numel() for p in pipe.unet.parameters())/1e6:.0f} M params, "
                                   f"reward {sum(p.numel() for p in reward.parameters())/1e6:.0f} M params")
    run.check("bf16 autocast", lambda: check_bf16_autocast(run, pipe))
    run.check("fp16 sampling", lambda: check_fp16_sampling(run, pipe))
    run.check("SDPA attention", lambda: check_sdpa(run, pipe))
    run.check("gradient checkpointing", lambda: check_checkpointing(run, pipe))
    run.check("8-bit Adam", lambda: check_adam8bit(run, pipe))
    with tempfile.TemporaryDirectory() as d:
        for name in filter(None, a.objectives.split(",")):
            for setup in SETUPS:
                what = f"{name}, {setup}"
                try:
                    dt, peak = train_step(run, pipe, reward, name, setup, steps, f"{d}/{name}-{setup}")
                    run.add("training step", what, f"{dt:.3f} s/step" + (f", peak {peak:.1f} GiB" if peak == peak else ""))
                except torch.OutOfMemoryError:
                    gc.collect(); torch.cuda.empty_cache()
                    run.add("training step", what, "out of memory on this card")
                except Exception as e:
                    traceback.print_exc()
                    run.add("training step", what, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", ok=False)
    try:
        n = 4 if run.rehearsal else 20
        ta, tb, r = generation_ratio(run, pipe, steps=n, pairs=pairs)
        run.add("generation", f"combined (original_unet_steps = N) / StableDiffusionPipeline, {n} DDIM steps, batch 1"
                + ("" if run.rehearsal else ", fp16"), f"median ratio {r:.3f} ({tb*1e3:.0f} ms vs {ta*1e3:.0f} ms)")
    except Exception as e:
        traceback.print_exc(); run.add("generation", "combined vs StableDiffusionPipeline", f"FAILED: {type(e).__name__}: {e}", ok=False)
    run_transformers(run, [f for f in a.families.split(",") if f], steps, pairs)
    text = table(run)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True); Path(out).write_text(text); print(f"wrote {out}")
    if run.failed:
        print(f"bench/gpu.py: FAILED: {'; '.join(run.failed)}", file=sys.stderr); return 1
    return 0


if __name__ == "__main__": sys.exit(main())
