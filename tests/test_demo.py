"`imagerefl demo --quick`: every file is written with the expected columns, and a seed reproduces the numbers."
import os, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest
from PIL import Image
from imagerefl.experiments import demo, DEMO_PLANS, demo_settings

METRIC_COLS = ["reward_mean", "reward_ci_low", "reward_ci_high", "diversity_mean", "diversity_ci_low",
               "diversity_ci_high", "fid", "kid", "kid_std"]

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")/"quick"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "imagerefl.cli", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out

def test_quick_demo_writes_every_file(quick_run):
    for f in ("results.csv", "report.md", "tradeoff.png", "grid.png"): assert (quick_run/f).is_file(), f
    df = pd.read_csv(quick_run/"results.csv")
    settings = demo_settings(DEMO_PLANS["quick"])
    assert df.method.tolist() == [s.method for s in settings]
    assert {"method", "model", "sampler", "original_unet_steps", "aig_power", "n_images", *METRIC_COLS} <= set(df.columns)
    assert df[METRIC_COLS].notna().all().all()
    assert (df.n_images == DEMO_PLANS["quick"].prompts * DEMO_PLANS["quick"].images_per_prompt).all()
    assert (df.reward_ci_low <= df.reward_mean).all() and (df.reward_mean <= df.reward_ci_high).all()
    for f in ("tradeoff.png", "grid.png"): assert Image.open(quick_run/f).format == "PNG"
    report = (quick_run/"report.md").read_text()
    assert "ReFL lowers diversity" in report and "Combined generation" in report and "ImageReFL" in report
    for run in ("refl", "imagerefl"): assert (quick_run/"train"/run/"final"/"combined"/"model_index.json").is_file()

def test_quick_demo_is_reproducible(quick_run, tmp_path):
    again = demo(tmp_path/"again", quick=True, seed=0, progress=False)
    first = pd.read_csv(quick_run/"results.csv")
    pd.testing.assert_frame_equal(first[METRIC_COLS], again[METRIC_COLS], rtol=1e-5, atol=1e-6)

def test_demo_rerun_reuses_finished_work(quick_run):
    before = {p: p.stat().st_mtime_ns for p in (quick_run/"eval").rglob("*.png")}
    demo(quick_run, quick=True, seed=0, progress=False)
    after = {p: p.stat().st_mtime_ns for p in (quick_run/"eval").rglob("*.png")}
    assert before == after          # no image regenerated, no training rerun
