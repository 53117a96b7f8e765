"""Issue 34: the full demo plan samples the gradual part of the trade-off. The plan's shape; `plan_checks` on tables with
known answers; the prediction drift on a case with a known answer; and the plan's properties on the finished
confirmatory demos of the shipped plan (`tests/data/demo_seed200_<reward>_results.csv`, the `results.csv` of
`imagerefl demo --seed 200 [--reward mini-legibility]`)."""
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from imagerefl.mini.demo import prediction_drift
from imagerefl.mini.plan import DEMO_PLANS, checkpoint_steps, plan_checks, demo_settings

DATA = Path(__file__).parent/"data"
FULL = DEMO_PLANS["full"]

def test_the_full_plan_samples_the_curve():
    "Six or more checkpoints per run, the first early, five or more training seeds, the learning rate of the gradual collapse."
    for m, n in (("refl", FULL.train_steps), ("imagerefl", FULL.imagerefl_steps)):
        steps = checkpoint_steps(FULL, m)
        assert len(steps) >= 6 and steps[-1] == n and steps[0] <= n / 10
        assert "optimizer.lr=1e-5" in FULL.train_overrides[m]
    assert len(FULL.train_seeds) >= 5
    assert set(FULL.diffusion_weights) == {"mini-preference", "mini-legibility"}
    assert {s.train_step for s in demo_settings(FULL) if s.model == "refl"} == set(checkpoint_steps(FULL, "refl"))

def _table(first_reward:float, first_div:float=0.15)->pd.DataFrame:
    "A results table, 2 seeds: the base at CFG 1 (reward 10, diversity 0.2), each model's checkpoints at steps 1-3."
    rows = [dict(method="base", model="base", sampler="base", base_guidance=1.0, tuned_guidance=np.nan, train_seed=np.nan,
                 train_step=np.nan, reward_mean=10.0, diversity_mean=0.2)]
    for m in ("refl", "imagerefl"):
        for s in (0, 1):
            for t, (r, d) in enumerate([(first_reward, first_div), (first_reward + 4, 0.08), (first_reward + 8, 0.02)], 1):
                rows.append(dict(method=f"{m} (training)" if t < 3 else m, model=m, sampler="tuned", base_guidance=np.nan,
                                 tuned_guidance=1.0, train_seed=s, train_step=t, reward_mean=r + 0.1*s, diversity_mean=d))
    df = pd.DataFrame(rows)
    for c in ("reward", "diversity"):
        df[f"{c}_ci_low"], df[f"{c}_ci_high"] = df[f"{c}_mean"] - 0.01, df[f"{c}_mean"] + 0.01
    return df

def test_plan_checks_known_answers():
    "Levels at 1/3 and 2/3 of the shared range [10, 18]: 12.67 and 15.33. First checkpoints at 11 bracket both; at 14, not the lower."
    ok = plan_checks(_table(11.0), FULL)
    first = ok[ok.check.str.startswith("first")]
    assert len(first) == 4 and first.ok.all() and np.allclose(first.value, 0.75)
    br = ok[ok.check.str.startswith("level")]
    assert len(br) and br.ok.all() and set(br.plan) == {"shared", "control"}
    bad = plan_checks(_table(14.0, first_div=0.05), FULL)
    assert not bad[bad.check.str.startswith("first")].ok.any()                        # 0.05 < 0.2 / 2
    b = bad[bad.check.str.startswith("level")]
    assert not b[b.level < 14].ok.any() and b[b.level > 14.3].ok.all()               # between the base and a first checkpoint: not bracketed

def test_drift_is_zero_where_the_tuned_model_is_the_base():
    "A tuned model equal to the base at the early steps (t >= 500) and the base plus 0.25 after: drift 0, then exactly 0.25."
    from imagerefl.export import load_models
    base, _ = load_models("mini")
    class Late(torch.nn.Module):
        def __init__(self, u): super().__init__(); self.u = u
        def forward(self, x, t, **kw):
            o = self.u(x, t, **kw); return type(o)(sample=o.sample + (0.25 if t < 500 else 0.0))
    d = prediction_drift(base, Late(base.unet), ["a 1", "a 5", "an 8"], num_inference_steps=10, seed=3)
    s = type(base.scheduler).from_config(base.scheduler.config); s.set_timesteps(10)
    early = (s.timesteps >= 500).numpy()
    assert early.any() and (~early).any()
    assert (d[early] == 0).all() and np.allclose(d[~early], 0.25, atol=1e-5)

@pytest.mark.parametrize("reward", ["preference", "legibility"])
def test_the_confirmatory_demo_has_the_plans_properties(reward):
    "The finished confirmatory demo of the shipped plan: its checkpoints are the plan's; each first checkpoint keeps half the base's diversity; every matched level is bracketed."
    df = pd.read_csv(DATA/f"demo_seed200_{reward}_results.csv")   # committed with the results page: missing is a failure
    for m in ("refl", "imagerefl"):
        assert sorted(df[(df.model == m) & (df.sampler == "tuned")].train_step.unique()) == checkpoint_steps(FULL, m)
    assert sorted(df.train_seed.dropna().unique()) == [200 + s for s in FULL.train_seeds]
    checks = plan_checks(df, FULL)
    first = checks[checks.check.str.startswith("first")]
    assert len(first) == 2 * len(FULL.train_seeds) and first.ok.all(), first[~first.ok]
    br = checks[checks.check.str.startswith("level")]
    assert br.ok.all(), br[~br.ok]
