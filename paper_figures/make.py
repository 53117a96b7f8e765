#!/usr/bin/env python
"""Run the paper's experiments and draw its figures and table, one papermill notebook per step.

    python paper_figures/make.py mini  --out runs/mini            # the embedded mini world (CPU, about an hour)
    python paper_figures/make.py mini  --out /tmp/smoke --smoke   # every step in smoke mode (CI, a few minutes)
    python paper_figures/make.py sd15  --out runs/sd15            # SD1.5 + HPSv2.1 (GPU)
    python paper_figures/make.py sdxl  --out runs/sdxl            # SDXL + HPSv2.1, ImageReFL only (GPU)
    python paper_figures/make.py figures --out runs/mini          # only the figures, from the outputs already there
    python paper_figures/make.py figures --demo demo --out figs   # the figures of an `imagerefl demo` folder
    python paper_figures/make.py mini  --out /tmp/smoke --smoke --in-process   # every notebook in this process (CI)

Layout under --out: train/<run>/ (trainer run folders), results/<step>/ (evaluate folders + results.csv),
figures/ (fig1_diversity_collapse.png, tradeoff*.png, comparison_grid.png, table.md, table.csv),
notebooks/ (every executed notebook, with its outputs). A step whose output exists is skipped (--force reruns it).
"""
from __future__ import annotations
import argparse, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS, FIGURES = ROOT/"nbs"/"experiments", ROOT/"paper_figures"

# What each world trains and measures (the paper's protocol for sd15/sdxl: 400 HPDv2 test prompts x 5 seeds, N = 40).
PAPER_REWARDS = ["hps-v2.1", "pickscore", "imagereward", "clip-score"]
PLANS = {
    "mini": dict(base="mini", runs=dict(refl="mini_refl", imagerefl="mini_imagerefl"), rewards=["mini-legibility"],
                 features=["mini"], prompts="mini-digits", prompts_split="test", num_prompts=30, images_per_prompt=5,
                 num_inference_steps=40, switch=dict(refl=[10, 20, 25, 30, 35], imagerefl=[20, 30]), aig=dict(refl=[1, 2, 4]),
                 reference="mini-digits", fid_features="mini", diversity_features="mini", batch_size=60),
    "sd15": dict(base="stable-diffusion-v1-5/stable-diffusion-v1-5", runs=dict(refl="sd15_hps21_refl", imagerefl="sd15_hps21_imagerefl"),
                 rewards=PAPER_REWARDS, features=["dino", "clip"], prompts="hpdv2", prompts_split="test", num_prompts=400,
                 images_per_prompt=5, num_inference_steps=40, switch=dict(refl=[20, 25, 30, 32, 35, 38], imagerefl=[20, 25, 30, 32, 35, 38]),
                 aig=dict(refl=[1, 1.25, 1.5, 2, 3, 4, 5]), reference="coco", fid_features=None, diversity_features="dino", batch_size=16),
    "sdxl": dict(base="stabilityai/stable-diffusion-xl-base-1.0", runs=dict(imagerefl="sdxl_hps21_imagerefl"),
                 rewards=PAPER_REWARDS, features=["dino", "clip"], prompts="hpdv2", prompts_split="test", num_prompts=400,
                 images_per_prompt=5, num_inference_steps=40, switch=dict(imagerefl=[20, 25, 32, 35, 38]), aig={},
                 reference="coco", fid_features=None, diversity_features="dino", batch_size=8),
}
LABELS = dict(refl="ReFL", imagerefl="ImageReFL", draftk="DRaFT-K")

ENGINE = None          # papermill's engine: None starts a Jupyter kernel per notebook; "in-process" (--in-process) does not

def in_process_engine():
    "A papermill engine that runs every notebook in this process, each in a fresh IPython shell (execnb's, as nbdev-test).\n\n"\
    "Starting a kernel and importing torch and diffusers costs 10-15 s per notebook on 2 CPU cores, more than a smoke "\
    "run's work; here the imports are paid once. Papermill still injects the parameters, records each cell's time and "\
    "raises `PapermillExecutionError` on the first failing cell. What differs from a kernel: the notebooks share "\
    "`sys.modules`, `os.environ` and global RNG state, so the default (a kernel per notebook) stays what users run."
    import nbformat
    from execnb.shell import CaptureShell
    from papermill.engines import Engine, papermill_engines
    class InProcessEngine(Engine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            shell = CaptureShell()
            for i, cell in enumerate(nb_man.nb.cells):
                if cell.cell_type != "code": continue
                nb_man.cell_start(cell, i)
                cell.outputs = [nbformat.from_dict(o) for o in shell.run(cell.source)]
                cell.execution_count = shell.execution_count - 1
                if shell.exc is not None:
                    nb_man.cell_exception(cell, cell_index=i, exception=shell.exc)
                    nb_man.cell_complete(cell, cell_index=i); break
                nb_man.cell_complete(cell, cell_index=i)
    papermill_engines.register("in-process", InProcessEngine)
    return "in-process"

def papermill(nb:Path, log:Path, **params):
    "Execute one notebook with papermill; its executed copy goes to `log`."
    import papermill as pm
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = " ".join(f"-p {k} {v}" for k, v in params.items() if not isinstance(v, (list, dict)))
    print(f"[make] papermill {nb.relative_to(ROOT)} {log} {shown}", flush=True)
    t = time.time()
    pm.execute_notebook(str(nb), str(log), parameters=params, kernel_name="python3", language="python", progress_bar=False,
                        engine_name=ENGINE)
    print(f"[make]   done in {time.time() - t:.0f} s", flush=True)

class Maker:
    def __init__(self, plan:dict, out:Path, smoke=False, force=False, device=None, base=None, configs=None,
                 reward_path=None, features_path=None):
        self.plan, self.out, self.smoke, self.force, self.device = plan, out.resolve(), smoke, force, device
        self.base = base or plan["base"]
        self.configs = {**plan["runs"], **(configs or {})}
        self.reward_paths = {plan["rewards"][0]: reward_path} if reward_path else {}
        self.features_paths = {plan["features"][0]: features_path} if features_path else {}
        self.n = 0

    def log(self, name): self.n += 1; return self.out/"notebooks"/f"{self.n:02d}_{name}.ipynb"
    def skip(self, path:Path)->bool:
        if path.exists() and not self.force: print(f"[make] {path} exists: skipped"); return True
        return False

    def common(self)->dict:
        p = self.plan
        return dict(base=self.base, prompts=p["prompts"], prompts_split=p["prompts_split"], num_prompts=p["num_prompts"],
                    images_per_prompt=p["images_per_prompt"], num_inference_steps=p["num_inference_steps"], rewards=p["rewards"],
                    reward_paths=self.reward_paths, features=p["features"], features_paths=self.features_paths,
                    batch_size=p["batch_size"], device=self.device, smoke=self.smoke)

    def train(self):
        for name, config in self.configs.items():
            run = self.out/"train"/name
            if self.skip(run/"final"/"combined"/"model_index.json"): continue
            papermill(EXPERIMENTS/"train.ipynb", self.log(f"train_{name}"), config=str(config), out_dir=str(run), smoke=self.smoke,
                      device=self.device, base=None if self.base == self.plan["base"] else self.base,
                      reward_path=self.reward_paths.get(self.plan["rewards"][0]), diversity_features=self.plan["diversity_features"])

    def evaluate(self):
        p, fid = self.plan, dict(reference=self.plan["reference"], fid_features=self.plan["fid_features"])
        todo = [("base", dict(sampler="base", method="base", model="base", tuned=None))]
        todo += [(name, dict(sampler="tuned", method=name, model=name, tuned=str(self.out/"train"/name))) for name in self.configs]
        for step, kw in todo:
            out = self.out/"results"/step
            if self.skip(out/"results.csv"): continue
            papermill(EXPERIMENTS/"evaluate.ipynb", self.log(f"evaluate_{step}"), out_dir=str(out), **kw, **fid, **self.common())
        for name, ks in p["switch"].items():
            out = self.out/"results"/f"{name}_combined"
            if name not in self.configs or self.skip(out/"results.csv"): continue
            papermill(EXPERIMENTS/"combined_sweep.ipynb", self.log(f"combined_{name}"), tuned=str(self.out/"train"/name), out_dir=str(out),
                      method=f"{name}+combined", model=name, original_unet_steps=ks, **self.common())
        for name, powers in p["aig"].items():
            out = self.out/"results"/f"{name}_aig"
            if name not in self.configs or self.skip(out/"results.csv"): continue
            papermill(EXPERIMENTS/"aig_sweep.ipynb", self.log(f"aig_{name}"), tuned=str(self.out/"train"/name), out_dir=str(out),
                      method=f"{name}+aig", model=name, aig_powers=powers, **self.common())

def _middle(folders:list[Path])->Path|None:
    "The middle one of setting folders like refl-combined-k20, ordered by their number."
    key = lambda f: float(f.name.rsplit("-", 1)[1][1:])
    folders = sorted(folders, key=key)
    return folders[len(folders) // 2] if folders else None

def figures(out:Path, results:list[Path], evals:dict, fig1_run:Path|None):
    "Run the four paper_figures notebooks into out/figures."
    figs, logs = out/"figures", out/"notebooks"
    if fig1_run is not None and (fig1_run/"samples").is_dir():
        papermill(FIGURES/"fig1_diversity_collapse.ipynb", logs/"fig1_diversity_collapse.ipynb", run=str(fig1_run), out_dir=str(figs))
    else: print(f"[make] no validation samples in {fig1_run}: Figure 1 skipped (train with validation.every > 0)")
    papermill(FIGURES/"tradeoff.ipynb", logs/"tradeoff.ipynb", results=[str(r) for r in results], out_dir=str(figs))
    papermill(FIGURES/"comparison_grids.ipynb", logs/"comparison_grids.ipynb", evals={k: str(v) for k, v in evals.items()},
              n_samples=min(6, _images_per_prompt(next(iter(evals.values())))), out_dir=str(figs))
    papermill(FIGURES/"paper_table.ipynb", logs/"paper_table.ipynb", results=[str(r) for r in results], out_dir=str(figs))

def _images_per_prompt(eval_dir:Path)->int:
    import pandas as pd
    return int(pd.read_csv(Path(eval_dir)/"images.csv").groupby("prompt_id").size().min())

def figures_from_runs(out:Path):
    "The figures of a `make.py <world>` output folder."
    res = out/"results"
    results = sorted(res.glob("*/results.csv"))
    if not results: sys.exit(f"make.py: no results/*/results.csv under {out}: run the experiments first")
    evals = {"base": res/"base"/"base-base"}
    for name in ("refl", "imagerefl", "draftk"):
        if (res/name/f"{name}-tuned").is_dir(): evals[LABELS[name]] = res/name/f"{name}-tuned"
        aig = _middle(list((res/f"{name}_aig").glob(f"{name}-aig-p*")))
        if aig: evals[f"{LABELS[name]} + AIG ({aig.name.rsplit('-', 1)[1]})"] = aig
        comb = _middle(list((res/f"{name}_combined").glob(f"{name}-combined-k*")))
        if comb: evals[f"{LABELS[name]} + combined ({comb.name.rsplit('-', 1)[1]})"] = comb
    figures(out, results, evals, out/"train"/"refl")

def figures_from_demo(demo:Path, out:Path):
    "The figures of an `imagerefl demo` folder (results.csv, eval/<setting>/, train/<run>/)."
    if (demo/"figures.json").is_file():      # the demo names its grid's settings and a training run
        import json
        spec = json.loads((demo/"figures.json").read_text())
        return figures(out, [demo/"results.csv"], {k: demo/v for k, v in spec["evals"].items()}, demo/spec["fig1_run"])
    ev = demo/"eval"
    evals = {"base": ev/"base-base"}
    for name in ("refl", "imagerefl"):
        evals[LABELS[name]] = ev/f"{name}-tuned"
        aig = _middle(list(ev.glob(f"{name}-aig-p*")))
        if aig: evals[f"{LABELS[name]} + AIG ({aig.name.rsplit('-', 1)[1]})"] = aig
        comb = _middle(list(ev.glob(f"{name}-combined-k*")))
        if comb: evals[f"{LABELS[name]} + combined ({comb.name.rsplit('-', 1)[1]})"] = comb
    figures(out, [demo/"results.csv"], evals, demo/"train"/"refl")

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=[*PLANS, "figures"], help="a world to run end to end, or only the figures")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--smoke", action="store_true", help="every notebook in smoke mode (tiny step counts, 2 prompts)")
    ap.add_argument("--force", action="store_true", help="rerun steps whose outputs exist")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: a GPU when present)")
    ap.add_argument("--demo", default=None, help="with `figures`: read an `imagerefl demo` folder instead of --out")
    ap.add_argument("--base", default=None, help="base model instead of the world's (a diffusers folder or hub id)")
    ap.add_argument("--config", action="append", default=[], metavar="RUN=CONFIG", help="train RUN (refl, imagerefl) with this config")
    ap.add_argument("--reward-path", default=None, help="checkpoint of the world's reward, instead of the default")
    ap.add_argument("--features-path", default=None, help="weights of the world's feature network, instead of the default")
    ap.add_argument("--in-process", action="store_true",
                    help="run the notebooks in this process instead of a Jupyter kernel each: imports paid once (smoke runs, CI)")
    a = ap.parse_args(argv)
    global ENGINE
    if a.in_process: ENGINE = in_process_engine()
    out = Path(a.out).resolve()
    if a.target == "figures":
        figures_from_demo(Path(a.demo).resolve(), out) if a.demo else figures_from_runs(out)
        return 0
    configs = dict(c.split("=", 1) for c in a.config)
    m = Maker(PLANS[a.target], out, a.smoke, a.force, a.device, a.base, configs, a.reward_path, a.features_path)
    m.train(); m.evaluate()
    figures_from_runs(out)
    print(f"[make] figures and table in {out/'figures'}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
