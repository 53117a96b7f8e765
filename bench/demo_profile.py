"""Where the demo's time goes: one ReFL and one ImageReFL optimizer step and one evaluation setting of a demo plan,
timed (wall and CPU) and profiled (cProfile), with the thread count the plan sets or the one given.

    python bench/demo_profile.py                      # the full plan (N = 20, batch 16, 12 prompts x 5 images)
    python bench/demo_profile.py --threads 1 2        # the same at one and at two torch threads, in turn
    python bench/demo_profile.py --plan quick --steps 1

On the 2-core development machine the time is UNet compute (forward, backward) almost entirely; see README, Measured.
Report CPU time beside wall time there: other jobs share the cores.
"""
from __future__ import annotations
import argparse, cProfile, copy, os, pstats, re, resource, sys, tempfile, time
import torch

PARTS = {"UNet forward": r"unet_2d_condition.py:\d+\(forward\)", "backward": r"run_backward",
         "VAE decode": r"autoencoder_kl.py:\d+\(decode\)", "VAE encode": r"autoencoder_kl.py:\d+\(encode\)",
         "text encoder": r"diffusion.py:\d+\(encode_prompt\)|pipeline_stable_diffusion.py:\d+\(encode_prompt\)",
         "reward": r"(registry|nets).py:\d+\(forward\)", "optimizer step": r"optimizer.py:\d+\(wrapper\)",
         "scheduler step": r"scheduling_ddpm.py:\d+\(step\)", "PNG write/read": r"evaluate.py:\d+\(_(save|load)_png\)",
         "scores, diversity, FID/KID": r"evaluate.py:\d+\(_(score|finish)\)", "checkpoint": r"train.py:\d+\(save_checkpoint\)"}

def cpu()->float: r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime

def parts(prof:cProfile.Profile)->dict:
    "Cumulative seconds of each part (the outermost matching frame)."
    st = pstats.Stats(prof).stats
    return {name: max([v[3] for k, v in st.items() if re.search(pat, f"{k[0]}:{k[1]}({k[2]})")] or [0.0]) for name, pat in PARTS.items()}

def timed(fn, n:int):
    "Run `fn` n times under cProfile: per-call (wall, cpu) and the profile."
    prof, out = cProfile.Profile(), []
    for _ in range(n):
        w, c = time.perf_counter(), cpu()
        prof.enable(); fn(); prof.disable()
        out.append((time.perf_counter() - w, cpu() - c))
    return out, prof

def trainer(plan, model:str):
    from imagerefl.mini.plan import train_steps_of
    from imagerefl.config import load_config
    from imagerefl.train import Trainer, build_data
    from imagerefl.config import model_source
    from imagerefl.objectives import make_objective
    from imagerefl.diffusion import Backbone
    from imagerefl.rewards import load_reward
    cfg = load_config(f"mini_{model}", [f"out_dir={tempfile.mkdtemp()}", "seed=0", f"max_steps={train_steps_of(plan, model)}",
                                        *plan.train_overrides[model]])
    oc = dict(cfg.objective); objective = make_objective(oc.pop("name"), oc)
    src = model_source(cfg.model.source)
    bb = Backbone.from_pretrained(src, scheduler=cfg.model.scheduler, num_inference_steps=objective.config.num_inference_steps)
    bb.pipe.set_progress_bar_config(disable=True)
    return Trainer(cfg, bb, objective, load_reward(cfg.reward.name), build_data(cfg, objective.needs_images, bb.resolution), base_source=src)

def eval_setting(plan):
    "A closure that evaluates combined generation (base CFG `plan.base_guidance`, the middle switch step) into a fresh folder."
    from imagerefl.export import load_models
    from imagerefl.sweeps import Setting, evaluate_setting
    from imagerefl.mini.demo import DigitAccuracy
    from imagerefl.mini.nets import load_mini_features
    from imagerefl.rewards import load_reward
    from imagerefl.data import load_prompts
    from imagerefl.mini.data import mini_digits
    base, _ = load_models("mini"); tuned = copy.deepcopy(base.unet)
    prompts = load_prompts("mini-digits", split="test")[:plan.prompts]
    features, reward = load_mini_features(), load_reward("mini-legibility")
    real = mini_digits("test", resolution=base.unet.config.sample_size * base.vae_scale_factor)
    kw = dict(rewards={"reward": reward, "accuracy": DigitAccuracy(reward)}, features={"mini": features},
              reference_images=torch.stack([real[i]["image"] for i in range(len(real))]), fid_features=features,
              images_per_prompt=plan.images_per_prompt, batch_size=plan.batch_size, seed=0,
              num_inference_steps=plan.num_inference_steps, progress=False)
    k = plan.refl_original_unet_steps[len(plan.refl_original_unet_steps) // 2]
    s = Setting("refl+combined", "refl", "combined", k, guidance_scale=float(plan.base_guidance), fine_tuned_guidance_scale=1.0)
    return lambda: evaluate_setting(base, tuned, s, prompts, tempfile.mkdtemp(), **kw), s.name

def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="full", help="a key of imagerefl.mini.plan.DEMO_PLANS")
    ap.add_argument("--threads", type=int, nargs="*", help="torch thread counts to run in turn (default: the plan's)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps timed per objective (after one warm-up step)")
    a = ap.parse_args(argv)
    from imagerefl.mini.plan import DEMO_PLANS
    plan = DEMO_PLANS[a.plan]
    print(f"plan {a.plan}: N = {plan.num_inference_steps}, {plan.prompts} prompts x {plan.images_per_prompt} images, "
          f"batch {plan.batch_size}; os.cpu_count() = {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for th in a.threads or [plan.threads]:
        torch.set_num_threads(th)
        jobs = [(m, (lambda t: lambda: t.update())(trainer(plan, m)), a.steps) for m in ("refl", "imagerefl")]
        run, name = eval_setting(plan)
        jobs.append((f"evaluate {name}", run, 1))
        for what, fn, n in jobs:
            fn()                                             # warm-up (first calls allocate, load, import)
            times, prof = timed(fn, n)
            p = parts(prof); total = sum(w for w, _ in times)
            shares = ", ".join(f"{k} {v/total:.0%}" for k, v in sorted(p.items(), key=lambda kv: -kv[1]) if v >= 0.01 * total)
            rows.append((th, what, n, sum(w for w, _ in times)/n, sum(c for _, c in times)/n, shares))
    print("\n| threads | what | calls | wall s per call | CPU s per call | share of profiled time |\n|---|---|---|---|---|---|")
    for r in rows: print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]} |")
    return 0

if __name__ == "__main__": sys.exit(main())
