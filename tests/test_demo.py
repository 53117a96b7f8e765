"`imagerefl demo --quick`: every file is written, every row states its sampler settings, a seed reproduces the results."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd
import pytest
from PIL import Image
from imagerefl.mini.demo import demo
from imagerefl.mini.plan import DEMO_PLANS, demo_settings
from imagerefl.claims import judge_claims, with_levels, control_levels

METRIC_COLS = ["reward_mean", "reward_ci_low", "reward_ci_high", "accuracy_mean", "diversity_mean", "diversity_ci_low",
               "diversity_ci_high", "fid", "kid", "kid_std"]
SAMPLER_COLS = ["base_guidance", "tuned_guidance", "num_inference_steps", "original_unet_steps", "aig_power", "train_seed",
                "train_step", "eval_seed"]
FILES = ("results.csv", "claims.csv", "claims_control_levels.csv", "report.md", "tradeoff.png", "collapse.png", "grid.png")

def _cli_demo(out, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "imagerefl.cli", "demo", "--quick", "--out", str(out), *extra],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 2/3: evaluate" in r.stdout + r.stderr           # the stages are in the progress output
    assert "Loading pipeline components" not in r.stderr           # diffusers' per-component loading bars are silenced
    return out

@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    "One quick demo through the CLI on the default (preference) reward, shared by every test here."
    return _cli_demo(tmp_path_factory.mktemp("demo")/"quick")

@pytest.fixture(scope="session")
def quick_legibility(tmp_path_factory):
    "One quick demo through the CLI on the legibility reward."
    return _cli_demo(tmp_path_factory.mktemp("demo")/"quick-legibility", "--reward", "mini-legibility")

def test_quick_reports_hold_both_tables(quick_run, quick_legibility):
    "Each report judges the claims by the reward trained on and again by the other one; every setting carries both rewards and the rule."
    for out, trained, other in ((quick_run, "mini-preference", "mini-legibility"), (quick_legibility, "mini-legibility", "mini-preference")):
        report = (out/"report.md").read_text()
        assert f"### Judged by the training reward ({trained})" in report
        assert f"### The same models judged by the {other} reward (not trained on)" in report
        assert "### The second analysis plan: matched reward levels from the controls' curves" in report
        assert report.count("| claim | control | measure | reward_level | effect | interval | seeds_held | verdict |") == 3
        assert "diversity intervals (over prompts, 16 images per setting) are" in report
        assert "Evaluation: 4 held-out prompts x 4 images, 8 DDPM steps" in report and "{" not in report   # every field filled in
        df = pd.read_csv(out/"results.csv")
        assert df[[f"reward_{other.removeprefix('mini-')}_mean", "reward_rule_mean"]].notna().all().all()
        assert json.loads((out/"demo.json").read_text()) == {"reward": trained}
    assert "Headroom and reward hacking" in (quick_run/"report.md").read_text()
    a, b = (pd.read_csv(o/"results.csv") for o in (quick_run, quick_legibility))
    assert np.allclose(a.reward_mean[a.method == "base"], b.reward_preference_mean[b.method == "base"])   # the same base images
    assert not np.allclose(a.reward_mean[a.method == "refl"], b.reward_preference_mean[b.method == "refl"]) # trained on different rewards

def test_unknown_reward_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "imagerefl.cli", "demo", "--quick", "--reward", "hps", "--out", str(tmp_path/"x")],
                       capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert r.returncode == 2 and r.stdout == ""                   # argparse's choices: --help lists them, the error names them
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("imagerefl demo: error: argument --reward: invalid choice: 'hps'") and "preference" in last and "legibility" in last
    assert not (tmp_path/"x").exists()

def test_a_folder_holds_one_rewards_demo(quick_run):
    from imagerefl.core import UserError
    with pytest.raises(UserError, match="holds a demo on the mini-preference reward, not mini-legibility"):
        demo(quick_run, quick=True, reward="mini-legibility", progress=False)

def test_eval_without_demo_json_is_not_a_demo_folder(tmp_path):
    "A demo writes demo.json before anything else: evaluations without it are another tool's folder, refused and left as they were."
    from imagerefl.core import UserError
    (tmp_path/"eval").mkdir()
    with pytest.raises(UserError, match="holds eval/ but no demo.json: not a demo folder"): demo(tmp_path, quick=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]

def test_quick_demo_writes_every_file(quick_run):
    for f in FILES: assert (quick_run/f).is_file(), f
    for f in FILES[4:]: assert Image.open(quick_run/f).format == "PNG"
    df = pd.read_csv(quick_run/"results.csv")
    plan = DEMO_PLANS["quick"]
    assert df.method.tolist() == [s.method for s in demo_settings(plan)]
    assert df[METRIC_COLS].notna().all().all()
    assert (df.n_images == plan.prompts * plan.images_per_prompt).all()
    assert (df.reward_ci_low <= df.reward_mean).all() and (df.reward_mean <= df.reward_ci_high).all()
    report = (quick_run/"report.md").read_text()
    assert "positive control" in report and "Combined generation" in report and "base at the same CFG" in report
    for m in ("refl", "imagerefl"): assert (quick_run/"train"/f"{m}-seed0"/"final"/"combined"/"model_index.json").is_file()
    spec = json.loads((quick_run/"figures.json").read_text())     # what `paper_figures/make.py figures --demo` reads
    assert len(spec["evals"]) == 6 and all((quick_run/d/"images.csv").is_file() for d in spec["evals"].values())
    assert (quick_run/spec["fig1_run"]/"train_log.csv").is_file()
    # issue 34: the plan's properties and the prediction drift, with their columns, and both sections in the report
    checks = pd.read_csv(quick_run/"plan_checks.csv")
    assert checks.columns.tolist() == ["check", "plan", "model", "train_seed", "train_step", "level", "value", "ok"]
    assert (checks.check == "first checkpoint keeps half the base's diversity").sum() == 2 * len(plan.train_seeds)
    drift = pd.read_csv(quick_run/"drift.csv")
    assert drift.columns.tolist() == ["level", "model", "train_seed", "train_step", "reward", "step_index", "drift"]
    if len(drift):
        assert set(drift.step_index) == set(range(plan.num_inference_steps)) and (drift.drift >= 0).all()
        assert Image.open(quick_run/"drift.png").format == "PNG" and "prediction drift" in report
    assert "## The plan's properties" in report

def test_every_row_states_its_sampler_settings(quick_run):
    df = pd.read_csv(quick_run/"results.csv")
    assert set(SAMPLER_COLS) <= set(df.columns)
    plan = DEMO_PLANS["quick"]
    assert (df.num_inference_steps == plan.num_inference_steps).all() and (df.eval_seed == 0).all()
    # the CFG of every UNet that ran, and only of those; the base sweep holds the control of every tuned guidance
    ran_base = df.sampler.isin(["base", "aig"]) | ((df.sampler == "combined") & (df.original_unet_steps > 0))
    ran_tuned = df.sampler != "base"
    assert (df.base_guidance.notna() == ran_base).all() and (df.tuned_guidance.notna() == ran_tuned).all()
    assert set(df[df.sampler == "tuned"].tuned_guidance) <= set(df[df.sampler == "base"].base_guidance)
    assert df.loc[df.sampler == "base", "base_guidance"].tolist() == [float(g) for g in plan.base_guidances]
    tuned = df[df.model != "base"]
    assert tuned.train_seed.notna().all() and tuned.train_step.notna().all()
    assert df[df.sampler == "combined"].original_unet_steps.notna().all() and df[df.sampler != "combined"].original_unet_steps.isna().all()
    # the claims file is what the pure function gives on the table
    claims = pd.read_csv(quick_run/"claims.csv")
    assert claims.verdict.tolist() == judge_claims(df).verdict.tolist()
    second = pd.read_csv(quick_run/"claims_control_levels.csv")     # the second plan: the claims at equal reward only
    assert second.claim.tolist() == judge_claims(df, with_levels(control_levels)).claim.tolist()
    assert set(second.claim) == set(claims.claim[claims.measure == "diversity at equal reward"])
    assert set(claims.verdict) <= {"held", "did not hold", "inconclusive"}

# the legibility case is `slow`: the same units on the same worker pool, another reward network, so the preference case's
# assertion (the worker count does not change a result) again, at one more quick demo (~32 CPU s)
@pytest.mark.parametrize("reward", ["mini-preference", pytest.param("mini-legibility", marks=pytest.mark.slow)])
def test_same_seed_same_results(quick_run, quick_legibility, tmp_path, reward):
    "For each reward, a run with the same seed on two worker processes gives the one-process CLI run's results.csv, bit for bit."
    demo(tmp_path/"again", quick=True, seed=0, progress=False, workers=2, reward=reward)
    cli = quick_run if reward == "mini-preference" else quick_legibility
    assert (tmp_path/"again"/"results.csv").read_bytes() == (cli/"results.csv").read_bytes()

def test_a_failing_worker_stops_the_demo_with_its_error(tmp_path, monkeypatch):
    "A unit of work that fails in a worker process surfaces as the same one-line error, and nothing is left running."
    import dataclasses
    from imagerefl.core import UserError
    bad = dataclasses.replace(DEMO_PLANS["quick"], train_overrides={"refl": ("optimizer.lr=-1",)})
    with pytest.raises(UserError, match="lr"): demo(tmp_path/"bad", plan=bad, progress=False, workers=2)

def test_demo_rerun_reuses_finished_work(quick_run):
    before = {p: p.stat().st_mtime_ns for p in (quick_run/"eval").rglob("*.png")}
    demo(quick_run, quick=True, seed=0, progress=False)
    after = {p: p.stat().st_mtime_ns for p in (quick_run/"eval").rglob("*.png")}
    assert before == after          # no image regenerated, no training rerun

def test_subsample_bench_reproduces_the_run(quick_run):
    "bench/demo_subsample.py: the whole run recomputed from its images is the run's results table; fewer images change it."
    sys.path.insert(0, str(Path(__file__).parents[1]/"bench"))
    try: from demo_subsample import Run
    finally: sys.path.pop(0)
    run, df = Run(quick_run), pd.read_csv(quick_run/"results.csv")
    cols = ["reward_mean", "reward_ci_low", "reward_ci_high", "diversity_mean", "diversity_ci_low", "diversity_ci_high"]
    plan = DEMO_PLANS["quick"]
    same = run.table(plan.prompts, plan.images_per_prompt)
    assert np.allclose(same[cols].to_numpy(float), df[cols].to_numpy(float), rtol=0, atol=1e-6)
    fewer = run.table(plan.prompts, 2, drop=lambda r: r["sampler"] == "aig")
    assert (fewer.n_images == plan.prompts * 2).all() and "aig" not in set(fewer.sampler)
    assert not np.allclose(fewer.diversity_mean.to_numpy(), df[df.sampler != "aig"].diversity_mean.to_numpy())
    assert judge_claims(fewer).verdict.notna().all()

def test_subsample_bench_judges_by_either_plan(quick_run, capsys):
    "bench/demo_subsample.py --levels: the claims recomputed with the first plan's matched levels or the second's."
    sys.path.insert(0, str(Path(__file__).parents[1]/"bench"))
    try: from demo_subsample import main
    finally: sys.path.pop(0)
    tables = {}
    for levels in ("shared", "control"):
        assert main([str(quick_run), "--prompts", "4", "--images", "4", "3", "--levels", levels]) == 0
        out = capsys.readouterr().out
        assert f"{levels} levels" in out and "| claim | 4 x 4 | 4 x 3 |" in out
        tables[levels] = out
    df = pd.read_csv(quick_run/"results.csv")
    first, second = judge_claims(df), judge_claims(df, with_levels(control_levels))
    level = lambda c: f"at reward {c.reward_level:.2f}"
    for c in second[second.reward_level.notna()].itertuples(): assert level(c) in tables["control"]
    for c in first[first.reward_level.notna()].itertuples(): assert level(c) in tables["shared"]

def test_results_equal_those_before_the_module_split(quick_legibility):
    """The quick legibility demo's results.csv holds the rows and values it held before the trainer, the experiments and the mini
    world were split into one module per idea (`tests/data/quick_demo_results.csv`, written by that layout), less its
    `switch_step` column: a second name of `original_unet_steps` (equal on combined rows; on the others N or 0, which
    `sampler` and `num_inference_steps` say), plus the columns of the preference reward and its rule, scored since.
    Settings must match exactly; measured values to 1e-3 (the same up to the
    last digits where another CPU rounds differently)."""
    before = pd.read_csv(Path(__file__).parent/"data"/"quick_demo_results.csv")
    combined = before.sampler == "combined"
    assert (before.switch_step[combined] == before.original_unet_steps[combined]).all()
    before = before.drop(columns="switch_step")
    now = pd.read_csv(quick_legibility/"results.csv")
    added = [f"reward_{r}_{s}" for r in ("preference", "rule") for s in ("mean", "ci_low", "ci_high")]
    assert sorted(set(now.columns) - set(before.columns)) == sorted(added) and len(now) == len(before)
    now = now[list(before.columns)]
    measured = [c for c in now.columns if c.endswith(("_mean", "_ci_low", "_ci_high")) or c in ("fid", "kid", "kid_std")]
    settings = [c for c in now.columns if c not in measured]
    pd.testing.assert_frame_equal(now[settings], before[settings])
    np.testing.assert_allclose(now[measured].to_numpy(float), before[measured].to_numpy(float), rtol=1e-3, atol=1e-3)

def test_demo_refuses_a_folder_that_holds_something_else(tmp_path):
    from imagerefl.core import UserError
    for name in ("config.yaml", "run.json"):                     # a training run's file, an evaluation's
        (tmp_path/name).write_text("x: 1\n")
        with pytest.raises(UserError, match=f"holds {name}: a training run or an evaluation, not a demo"): demo(tmp_path, quick=True)
        (tmp_path/name).unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # nothing written
