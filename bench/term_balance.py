"""ImageReFL's two terms on the mini world (issue 34, item 2): the ratio of the gradient norms of the weighted diffusion
term and the reward term at step 0, and ImageReFL's trade-off curve at weights spanning 10^4.

    python bench/term_balance.py ratio                                   # both rewards, the paper's 0.01 and the demo's weights
    python bench/term_balance.py sensitivity --out runs/sens-pref --reward mini-preference --demo runs/demo-200   # w/100, w*100 (+ the demo's w)

`ratio`: at the base model (step 0), on `--batches` training micro-batches of the demo's full plan (N = 20, batch 16),
the gradient of ImageReFL's loss with the diffusion weight w and with weight 0, from the same random draws; their
difference is the gradient of w * L_diffusion. Under Adam only the ratio of the two terms' gradients matters (a common
scale cancels), so that ratio is what a weight sets. `sensitivity`: ImageReFL trained at w/100 and w*100 (the demo's full
plan otherwise) on one training seed, evaluated at the plan's checkpoints, drawn with a finished demo's run at w on the
same seeds in one trade-off figure (`sensitivity.png`, `sensitivity.csv` in `--out`; rerun with `--demo` once the demo
has finished: finished training and evaluation are reused).
"""
from __future__ import annotations
import argparse, dataclasses, json, math, sys, tempfile
from pathlib import Path
import numpy as np, pandas as pd, torch

def _trainer(reward:str, weight:float, seed:int=0):
    "A Trainer of the demo's full-plan ImageReFL run on `reward` (a demo reward: mini-preference or mini-legibility) with diffusion weight `weight`."
    from imagerefl.mini.plan import DEMO_PLANS
    from imagerefl.config import load_config, model_source
    from imagerefl.train import Trainer, build_data
    from imagerefl.objectives import make_objective
    from imagerefl.diffusion import Backbone
    from imagerefl.rewards import load_reward
    plan = DEMO_PLANS["full"]
    cfg = load_config("mini_imagerefl", [f"out_dir={tempfile.mkdtemp()}", f"seed={seed}", f"reward.name={reward}",
                                         f"objective.diffusion_weight={weight}", *plan.train_overrides["imagerefl"]])
    oc = dict(cfg.objective); objective = make_objective(oc.pop("name"), oc)
    src = model_source(cfg.model.source)
    bb = Backbone.from_pretrained(src, scheduler=cfg.model.scheduler, num_inference_steps=objective.config.num_inference_steps)
    bb.pipe.set_progress_bar_config(disable=True)
    return Trainer(cfg, bb, objective, load_reward(cfg.reward.name), build_data(cfg, objective.needs_images, bb.resolution), base_source=src)

def _grad(tr, batch, weight:float, seed:int)->torch.Tensor:
    "The flattened gradient of ImageReFL's loss at diffusion weight `weight`, with the random draws fixed by `seed`."
    tr.objective.config.diffusion_weight, tr.objective.calls = weight, 0
    params = [p for p in tr.model.parameters() if p.requires_grad]
    for p in params: p.grad = None
    torch.manual_seed(seed)
    loss, logs = tr.objective(tr.backbone, batch, tr.reward, denoiser=tr.model)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in params]), logs

def term_ratio(reward:str, batches:int=3)->dict:
    "Per micro-batch: ||grad(L_diffusion)|| / ||grad(L_reward)|| at the base model (multiply by w for the weighted term's ratio)."
    torch.set_num_threads(1)
    tr = _trainer(reward, 1.0)
    out = []
    for i in range(batches):
        batch = tr._next_batch()
        g1, logs = _grad(tr, batch, 1.0, i); g0, _ = _grad(tr, batch, 0.0, i)
        out.append(dict(batch=i, reward=logs["reward"], diffusion_loss=logs["diffusion_loss"],
                        grad_reward=g0.norm().item(), grad_diffusion=(g1 - g0).norm().item()))
    df = pd.DataFrame(out); df["ratio_w1"] = df.grad_diffusion / df.grad_reward
    return df

def ratio_main(a)->int:
    from imagerefl.mini.plan import DEMO_PLANS
    w_demo = DEMO_PLANS["full"].diffusion_weights
    print("| reward | batch | mean reward | ||grad L_diff|| | ||grad L_reward|| | ratio at w = 0.01 | ratio at the demo's w |")
    print("|---|---|---|---|---|---|---|")
    for r in a.rewards:
        df = term_ratio(r, a.batches)
        for x in df.itertuples():
            print(f"| {r} | {x.batch} | {x.reward:.3f} | {x.grad_diffusion:.4g} | {x.grad_reward:.4g} | {0.01*x.ratio_w1:.4g} | "
                  f"{w_demo.get(r, 0.01)*x.ratio_w1:.4g} (w = {w_demo.get(r, 0.01):g}) |")
        print(f"| {r} | mean | | | | {0.01*df.ratio_w1.mean():.4g} | {w_demo.get(r, 0.01)*df.ratio_w1.mean():.4g} |", flush=True)
    return 0

def sensitivity_main(a)->int:
    from imagerefl.mini.demo import _demo_job
    from imagerefl.mini.plan import DEMO_PLANS, checkpoint_steps, seed_summary
    from imagerefl.sweeps import Setting
    from imagerefl.figures import plot_tradeoff_curves, save_figure
    plan, out = DEMO_PLANS["full"], Path(a.out)
    w = plan.diffusion_weights.get(a.reward, 0.01)
    rows = []
    for f in a.factors:
        wf = w * f
        p = dataclasses.replace(plan, diffusion_weights={a.reward: wf})
        settings = [(i, Setting(f"imagerefl w={wf:g} (training)", "imagerefl", "tuned", fine_tuned_guidance_scale=1.0,
                                train_seed=a.train_seed, train_step=t)) for i, t in enumerate(checkpoint_steps(p, "imagerefl"))]
        _, got = _demo_job(out/f"w{wf:g}", p, a.eval_seed, "imagerefl", a.train_seed, settings, True, len(settings), a.reward)
        rows += [r for _, r in got]
    df = pd.DataFrame(rows)
    if a.demo:   # the demo's own run at w (same seeds), the base at CFG 1 and ReFL, from its results
        res = pd.read_csv(Path(a.demo)/"results.csv")
        one = lambda m: res[(res.model == m) & (res.sampler == "tuned") & (res.train_seed == a.train_seed) & np.isclose(res.tuned_guidance, 1.0)]
        mine = one("imagerefl").assign(method=f"imagerefl w={w:g} (training)")
        refl = one("refl").assign(method="refl (training)")
        base = res[(res.sampler == "base") & np.isclose(res.base_guidance, 1.0)]
        df = pd.concat([base, refl, mine, df], ignore_index=True)
    df.to_csv(out/"sensitivity.csv", index=False)
    save_figure(plot_tradeoff_curves(seed_summary(df), title=f"ImageReFL's diffusion weight ({a.reward} reward, training seed {a.train_seed})"),
                out/"sensitivity.png")
    print(df[["method", "train_step", "reward_mean", "diversity_mean"]].to_string(index=False))
    return 0

def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("ratio"); r.add_argument("--rewards", nargs="*", default=["mini-preference", "mini-legibility"]); r.add_argument("--batches", type=int, default=3)
    s = sub.add_parser("sensitivity"); s.add_argument("--out", required=True); s.add_argument("--reward", default="mini-preference")
    s.add_argument("--train-seed", type=int, default=200); s.add_argument("--eval-seed", type=int, default=200)
    s.add_argument("--demo", help="a finished demo with the same seeds: its run at w joins the figure")
    s.add_argument("--factors", type=float, nargs="*", default=[0.01, 100], help="multiples of the demo's weight trained here")
    a = ap.parse_args(argv)
    return ratio_main(a) if a.what == "ratio" else sensitivity_main(a)

if __name__ == "__main__": sys.exit(main())
