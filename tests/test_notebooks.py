"""Smoke runs of the papermill notebooks on the mini world: every experiment notebook and paper_figures notebook
(through `paper_figures/make.py mini --smoke --in-process`: one process, imports paid once), the explorer (headless),
and, each in its own Jupyter kernel as users run them, the explorer notebook, an experiment notebook and the Colab demo."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

@pytest.fixture(scope="module")
def world():
    "Arguments that point the notebooks at the shipped mini world (its defaults: nothing to override)."
    from imagerefl.mini.nets import mini_assets_dir
    assert (mini_assets_dir()/"base"/"model_index.json").exists(), "the mini world is not shipped: run `imagerefl mini pretrain`"
    return dict(make_args=[], base="mini", reward_path=None, imagerefl_config="mini_imagerefl")

def make(*args, cwd=ROOT):
    r = subprocess.run([sys.executable, str(ROOT/"paper_figures"/"make.py"), *map(str, args)], env=ENV, cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    return r

@pytest.fixture(scope="module")
def made(world, tmp_path_factory):
    "Every experiment notebook and every paper_figures notebook, in smoke mode, into one output folder."
    out = tmp_path_factory.mktemp("make")/"mini"
    elsewhere = tmp_path_factory.mktemp("cwd")                 # the notebooks' kernels start outside the repository
    r = make("mini", "--out", out, "--smoke", "--device", "cpu", "--in-process", *world["make_args"], cwd=elsewhere)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out

def png(path:Path)->Image.Image:
    assert path.is_file(), f"{path} was not written"
    im = Image.open(path); im.load()
    assert im.format == "PNG" and min(im.size) > 100, (im.format, im.size)
    return im

def test_experiment_notebooks_write_their_outputs(made):
    nbs = sorted(p.name for p in (made/"notebooks").glob("*.ipynb"))
    assert nbs == sorted(["01_train_refl.ipynb", "02_train_imagerefl.ipynb", "03_evaluate_base.ipynb", "04_evaluate_refl.ipynb",
                          "05_evaluate_imagerefl.ipynb", "06_combined_refl.ipynb", "07_combined_imagerefl.ipynb", "08_aig_refl.ipynb",
                          "comparison_grids.ipynb", "fig1_diversity_collapse.ipynb", "paper_table.ipynb", "tradeoff.ipynb"]), nbs
    for name in ("refl", "imagerefl"):
        run = made/"train"/name
        assert (run/"final"/"combined"/"model_index.json").is_file() and (run/"final"/"unet"/"config.json").is_file()
        assert sorted(p.name for p in (run/"samples").iterdir()) == ["step-0.png", "step-1.png", "step-2.png"]
        log = pd.read_csv(run/"train_log.csv")
        assert {"val/reward_tuned", "val/diversity_tuned", "val/diversity_combined", "loss"} <= set(log.name), set(log.name)
    res = {p.parent.name: pd.read_csv(p) for p in (made/"results").glob("*/results.csv")}
    assert sorted(res) == ["base", "imagerefl", "imagerefl_combined", "refl", "refl_aig", "refl_combined"]
    assert res["refl_combined"].original_unet_steps.tolist() == [0, 2, 4]        # the smoke switch points of N = 4
    assert res["refl_aig"].aig_power.tolist() == [1.0, 3.0]
    assert res["base"].sampler.tolist() == ["base"] and res["imagerefl"].sampler.tolist() == ["tuned"]
    for name, df in res.items():
        assert (df.n_images == 4).all(), name                                       # 2 prompts x 2 images
        assert df.reward_mean.notna().all() and df.diversity_mean.notna().all(), name
    # the sweep's end points are the separately evaluated models: k = 0 is the tuned model alone, k = N the base model
    for m in ("reward_mean", "diversity_mean"):
        assert res["refl_combined"][m].iloc[0] == pytest.approx(res["refl"][m].iloc[0], rel=1e-5)
        assert res["imagerefl_combined"][m].iloc[-1] == pytest.approx(res["base"][m].iloc[0], rel=1e-5)
    assert res["base"].fid.notna().all()                                             # FID/KID against the held-out digits
    ev = pd.read_csv(made/"results"/"refl_combined"/"refl-combined-k2"/"images.csv")
    assert len(ev) == 4 and all((made/"results"/"refl_combined"/"refl-combined-k2"/p).is_file() for p in ev.path)

def test_paper_figures_are_written(made):
    figs = made/"figures"
    png(figs/"fig1_diversity_collapse.png"); png(figs/"tradeoff.png")
    grid = png(figs/"comparison_grid.png")
    assert grid.height > grid.width                                                  # 2 prompts x 6 method rows, 2 columns
    md = (figs/"table.md").read_text().splitlines()
    assert md[0] == "| setting | reward | diversity | FID | KID |"
    settings = [line.split(" | ")[0][2:] for line in md[2:]]
    assert "base" in settings and "refl+combined (k=2)" in settings and "refl+aig (p=3)" in settings
    assert len(pd.read_csv(figs/"table.csv")) == len(settings) == 11

def test_figures_from_a_demo_folder(made, tmp_path):
    "`make.py figures --demo` reads the `imagerefl demo` layout: results.csv, eval/<setting>/, train/<run>/."
    demo = tmp_path/"demo"; (demo/"eval").mkdir(parents=True); (demo/"train").mkdir()
    pd.concat([pd.read_csv(p) for p in sorted((made/"results").glob("*/results.csv"))]).to_csv(demo/"results.csv", index=False)
    for setting in (made/"results").glob("*/*-*"):
        if setting.is_dir(): (demo/"eval"/setting.name).symlink_to(setting)
    (demo/"train"/"refl").symlink_to(made/"train"/"refl")
    r = make("figures", "--demo", demo, "--out", tmp_path/"figs", "--in-process")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("fig1_diversity_collapse.png", "tradeoff.png", "comparison_grid.png"): png(tmp_path/"figs"/"figures"/f)
    assert (tmp_path/"figs"/"figures"/"table.md").read_text().count("\n") == 13

def test_make_figures_without_results_says_what_to_do(tmp_path):
    r = make("figures", "--out", tmp_path)
    assert r.returncode != 0 and "no results/*/results.csv" in r.stderr and "run the experiments first" in r.stderr

def test_explorer_headless(world, made):
    "The widget builds on the mini world; moving the slider regenerates the combined image; k = 0 and k = N are the tuned and base images."
    from imagerefl.export import load_models
    from imagerefl.rewards import load_reward
    from imagerefl.explorer import make_explorer
    base_pipe, tuned_unet = load_models(world["base"], str(made/"train"/"imagerefl"))
    ex = make_explorer(base_pipe, tuned_unet, load_reward("mini-legibility", world["reward_path"]), prompt="a handwritten digit two",
                       num_inference_steps=4, original_unet_steps=2)
    first = bytes(ex.images["combined"].value)
    assert first.startswith(b"\x89PNG") and all(ex.images[n].value for n in ("base", "tuned"))
    assert all(isinstance(score, float) for _, score in ex.results.values())
    ex.controls["original_unet_steps"].value = 0
    assert bytes(ex.images["combined"].value) != first
    torch.testing.assert_close(ex.results["combined"][0], ex.results["tuned"][0])
    ex.controls["original_unet_steps"].value = 4
    torch.testing.assert_close(ex.results["combined"][0], ex.results["base"][0])
    ex.controls["prompt"].value = "a handwritten digit nine"                          # a new prompt regenerates all three
    assert bytes(ex.images["combined"].value) != first

def run_notebook(nb:Path, out:Path, cwd:Path, **params):
    import papermill as pm
    return pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name="python3", language="python",
                               progress_bar=False, cwd=str(cwd))

def last_output(nb)->str:
    return "".join(o.get("data", {}).get("text/plain", "") for o in nb.cells[-1].outputs)

def stdout(nb)->str:
    return "".join("".join(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")

def test_explorer_notebook_smoke(tmp_path, monkeypatch):
    "With its defaults, from a folder outside the repository: the missing mini-world tuned model is trained for 2 steps."
    monkeypatch.setenv("TMPDIR", str(tmp_path))                 # the notebook's temporary folders land here
    nb = run_notebook(ROOT/"nbs"/"notebooks"/"explorer.ipynb", tmp_path/"explorer.ipynb", tmp_path, smoke=True)
    assert "smoke: trained mini_imagerefl for 2 steps into " + str(tmp_path) in stdout(nb)
    out = last_output(nb)
    assert all(f"'{n}': -" in out for n in ("base", "tuned", "combined")), out           # three rewards (log-probabilities)

def test_experiment_notebook_from_another_folder(tmp_path, monkeypatch):
    "aig_sweep with its defaults, run outside the repository, where runs/mini_refl does not exist: trained on the fly."
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    (tmp_path/"cwd").mkdir()
    nb = run_notebook(ROOT/"nbs"/"experiments"/"aig_sweep.ipynb", tmp_path/"aig.ipynb", tmp_path/"cwd", smoke=True)
    out = next(l.split("writing to ", 1)[1] for l in stdout(nb).splitlines() if l.startswith("writing to "))
    assert out.startswith(str(tmp_path)) and pd.read_csv(Path(out)/"results.csv").aig_power.tolist() == [1.0, 3.0]
    assert list((tmp_path/"cwd").iterdir()) == []                # nothing written where the kernel started
    import papermill as pm                                      # without smoke, the missing model is named with its command
    with pytest.raises(pm.PapermillExecutionError, match="imagerefl train --config mini_refl"):
        run_notebook(ROOT/"nbs"/"experiments"/"aig_sweep.ipynb", tmp_path/"aig2.ipynb", tmp_path/"cwd", tuned="runs/no-such-run")

def colab_env(tmp_path, monkeypatch):
    "A stand-in `google.colab` module (a namespace package beside the real `google` ones), so the notebook takes its Colab paths."
    (tmp_path/"stub"/"google"/"colab").mkdir(parents=True)
    (tmp_path/"stub"/"google"/"colab"/"__init__.py").write_text('"Stand-in for Colab\'s module in tests."\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path/"stub"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    (tmp_path/"cwd").mkdir()

def test_colab_demo_cpu_runtime(tmp_path, monkeypatch):
    "Run all on a CPU 'Colab' with the defaults: nothing to install, the mini world (said so), base / combined / tuned scored."
    colab_env(tmp_path, monkeypatch)
    nb = run_notebook(ROOT/"nbs"/"notebooks"/"colab_demo.ipynb", tmp_path/"colab.ipynb", tmp_path/"cwd", smoke=True)
    out = stdout(nb)
    assert "installed: nothing was missing" in out and "No GPU here (cpu): running the embedded mini world" in out, out
    table = last_output(nb)
    assert all(s in table for s in ("base", "combined (base for 2 of 4)", "tuned", "mean")), table
    assert list((tmp_path/"cwd").iterdir()) == []

def test_colab_demo_released_model_path(tmp_path, monkeypatch):
    "The GPU path's loading code, on a local folder laid out like the authors' released model (remote-code class name)."
    from imagerefl.testing import tiny_sd_pipeline
    colab_env(tmp_path, monkeypatch)
    base, tuned = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    from imagerefl.sampling import CombinedStableDiffusionPipeline
    CombinedStableDiffusionPipeline.from_pipelines(base, tuned.unet).save_pretrained(tmp_path/"released")
    idx = json.loads((tmp_path/"released"/"model_index.json").read_text())
    idx.update(_class_name=["pipeline", "ImageReFLPipeline"], safety_checker=[None, None], requires_safety_checker=False)
    (tmp_path/"released"/"model_index.json").write_text(json.dumps(idx))
    (tmp_path/"released"/"pipeline.py").write_text("raise RuntimeError('remote code was executed')\n")
    nb = run_notebook(ROOT/"nbs"/"notebooks"/"colab_demo.ipynb", tmp_path/"colab.ipynb", tmp_path/"cwd", smoke=True,
                      world="released", model=str(tmp_path/"released"), reward="mini-legibility", prompts=["a handwritten digit one", "a handwritten digit two"])
    assert "released world on cpu (torch.float32)" in stdout(nb)
    table = last_output(nb)
    assert all(s in table for s in ("base", "combined (base for 2 of 4)", "tuned", "digit one", "digit two")), table

def test_notebooks_keep_the_parameters_tag():
    "nbdev-clean keeps the `parameters` tag papermill needs; every notebook names a kernel."
    nbs = [*sorted((ROOT/"nbs"/"experiments").glob("*.ipynb")), *sorted((ROOT/"paper_figures").glob("*.ipynb")),
           ROOT/"nbs"/"notebooks"/"explorer.ipynb", ROOT/"nbs"/"notebooks"/"colab_demo.ipynb"]
    assert len(nbs) == 10
    for p in nbs:
        nb = json.loads(p.read_text())
        assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]) == 1, p
        assert nb["metadata"]["kernelspec"]["name"] == "python3", p
    assert (ROOT/"nbs"/"experiments"/".notest").exists() and (ROOT/"nbs"/"notebooks"/".notest").exists()
