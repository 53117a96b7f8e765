"""What a smaller demo plan would have concluded: a finished demo folder's claims, recomputed on subsets of its images
(the first m prompts, the first n images of each prompt) and without some settings, next to the claims as run.

    python bench/demo_subsample.py demo                            # as run, then one image and a quarter of the prompts fewer
    python bench/demo_subsample.py demo --prompts 12 9 --images 4 3 --drop-aig-power 4
    python bench/demo_subsample.py demo --levels control           # the second analysis plan's matched levels

An image's seed depends only on (evaluation seed, prompt, sample) (`metrics.image_seed`), so the first n images of a
prompt are the images a plan with n images per prompt draws (up to float rounding of another batch size): each subset
gives the smaller plan's numbers without running it. Rewards come from `images.csv`; diversity is recomputed from the
saved PNGs with the mini feature network, as `evaluate` computes it. Used to choose the full plan (README, Measured).
"""
from __future__ import annotations
import argparse, math, sys
from pathlib import Path
import pandas as pd, torch

def folder_name(row)->str:
    "The evaluation folder of a results row (`Setting.name` rebuilt from the row's settings)."
    from imagerefl.sweeps import Setting
    num = lambda v, f=float: None if v is None or (isinstance(v, float) and math.isnan(v)) else f(v)
    kw = dict(train_seed=num(row.get("train_seed"), int), train_step=num(row.get("train_step"), int))
    if row["sampler"] in ("base", "combined"): kw["guidance_scale"] = num(row["base_guidance"])
    if row["sampler"] in ("tuned", "combined"): kw["fine_tuned_guidance_scale"] = num(row["tuned_guidance"])
    if row["sampler"] == "aig": kw["aig_guidance_scale"] = num(row["base_guidance"])
    if row["sampler"] == "combined": kw["original_unet_steps"] = num(row["original_unet_steps"], int)
    if row["sampler"] == "aig": kw["aig_power"] = num(row["aig_power"])
    return Setting(row["method"], row["model"], row["sampler"], **kw).name

class Run:
    "A demo folder's results table with each row's per-image rewards and mini features."
    def __init__(self, folder:Path):
        from imagerefl.mini.nets import load_mini_features
        from imagerefl.evaluate import _load_png
        self.results = pd.read_csv(folder/"results.csv")
        net, self.images, self.features = load_mini_features().eval(), [], []
        for _, row in self.results.iterrows():
            d = folder/"eval"/folder_name(row)
            if not (d/"images.csv").exists(): sys.exit(f"{d} has no images.csv: is {folder} a finished demo folder?")
            t = pd.read_csv(d/"images.csv")
            with torch.no_grad(): f = net(torch.stack([_load_png(d/p) for p in t.path])).float()
            self.images.append(t); self.features.append(f)

    def table(self, prompts:int, images:int, drop=lambda row: False)->pd.DataFrame:
        "The results table as a plan with `prompts` prompts and `images` images per prompt would have measured it."
        from imagerefl.metrics import pairwise_diversity, summarize
        rows = []
        for (_, row), t, f in zip(self.results.iterrows(), self.images, self.features):
            if drop(row): continue
            keep = ((t["sample"] < images) & (t.prompt_id < prompts)).to_numpy()
            sub = t[keep]; row = row.copy()
            per_prompt = dict(reward=sub.groupby("prompt_id", sort=True).reward.mean().to_numpy(),
                              diversity=pairwise_diversity(f[torch.tensor(keep)], sub.prompt_id.tolist()).diversity.to_numpy())
            for m, v in per_prompt.items():   # as `evaluate` summarises: mean over prompts, t-interval across prompts
                s = summarize(v); row[f"{m}_mean"], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = s.mean, s.ci_low, s.ci_high
            row["n_images"] = int(keep.sum())
            rows.append(row)
        return pd.DataFrame(rows)

def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a finished `imagerefl demo` output folder")
    ap.add_argument("--prompts", type=int, nargs="*", help="prompt counts to try (default: as run and 3/4 of it)")
    ap.add_argument("--images", type=int, nargs="*", help="images per prompt to try (default: as run and one fewer)")
    ap.add_argument("--drop-aig-power", type=float, nargs="*", default=[], help="also try without these AIG powers")
    ap.add_argument("--levels", choices=("shared", "control"), default="shared",
                    help="matched reward levels: the first analysis plan's (shared range of both curves) or the second's (the controls' curves)")
    a = ap.parse_args(argv)
    from imagerefl.claims import judge_claims, with_levels, control_levels, CLAIMS, MATCHED_CLAIMS
    judged = CLAIMS if a.levels == "shared" else [c for c in CLAIMS if c not in MATCHED_CLAIMS] + with_levels(control_levels)
    from imagerefl.figures import markdown_table
    run = Run(a.folder)
    n_prompts = int(run.images[0].prompt_id.nunique()); n_images = int(run.images[0]["sample"].nunique())
    plans = [(p, i, ()) for p in (a.prompts or [n_prompts, round(n_prompts * 3 / 4)])
             for i in (a.images or [n_images, n_images - 1])]
    if any(p > n_prompts or i > n_images or p < 2 or i < 2 for p, i, _ in plans):
        sys.exit(f"the run has {n_prompts} prompts x {n_images} images: try 2 to {n_prompts} prompts and 2 to {n_images} images")
    if a.drop_aig_power: plans.append((n_prompts, n_images, tuple(a.drop_aig_power)))
    out = []
    for p, i, drop in plans:
        label = f"{p} x {i}" + (f", no AIG power {', '.join(f'{x:g}' for x in drop)}" if drop else "")
        df = run.table(p, i, lambda r: r["sampler"] == "aig" and any(math.isclose(r["aig_power"], x) for x in drop))
        for c in judge_claims(df, judged).itertuples():
            level = f" at reward {c.reward_level:.2f}" if pd.notna(c.reward_level) else ""
            interval = f"{c.effect:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]" if pd.notna(c.effect) else "–"
            out.append(dict(plan=label, claim=f"{c.claim} (control: {c.control[:40]}…)", result=f"{interval}{level}, {c.seeds_held} {c.verdict}"))
    table = pd.DataFrame(out)
    table["level"] = table.groupby(["plan", "claim"]).cumcount()   # a claim at matched reward comes once per reward level
    first = {c: i for i, c in reversed(list(enumerate(table.claim)))}
    order = sorted(dict.fromkeys(zip(table.claim, table.level)), key=lambda k: (first[k[0]], k[1]))  # a plan may find fewer levels: "–" there
    wide = table.pivot(index=["claim", "level"], columns="plan", values="result").reindex(order)[list(dict.fromkeys(table.plan))].fillna("–")
    wide.index = pd.Index([c for c, _ in order], name="claim")
    print(f"{a.folder}: {len(run.results)} settings, {n_prompts} prompts x {n_images} images as run, {a.levels} levels; "
          "each cell: effect [95 % interval across training seeds (one seed: across prompts)], seeds where it held, verdict\n")
    print(markdown_table(wide))
    verdict = lambda cell: next((v for v in ("did not hold", "inconclusive", "held") if cell.endswith(v)), cell)
    changed = [(c, [verdict(v) for v in row]) for c, row in zip(wide.index, wide.itertuples(index=False)) if len({verdict(v) for v in row}) > 1]
    print(f"verdicts that change between the plans: {len(changed)} of {len(wide)}")
    for c, vs in changed: print(f"- {c}: " + "; ".join(f"{pl}: {v}" for pl, v in zip(wide.columns, vs)))
    return 0

if __name__ == "__main__": sys.exit(main())
