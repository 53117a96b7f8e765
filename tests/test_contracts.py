"""Contracts at the boundaries that a user's own parts and real machines cross: a reward of the user's own, a damaged
weights file, an interrupted demo, a number out of range. Each breach ends in one line that says what to do (status 2
from the CLI; 128 + the signal's number for an interruption), never a traceback, and whatever was written before
stays as it was."""
import hashlib, os, shutil, signal, subprocess, sys, time
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest, torch
from imagerefl.cli import main
from imagerefl.core import UserError
from imagerefl.mini.nets import mini_base_path
from imagerefl.mini.plan import DEMO_PLANS
import imagerefl.sampling   # diffusers' log handler binds the real stderr now, not a test's captured one

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv):
    "main(argv) -> (status, the error line); a status-2 error is one line (after any progress bar), without a traceback."
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    if rc == 2:
        assert "Traceback" not in err and [l for l in err.splitlines() if l.startswith("imagerefl: ")] == [err.splitlines()[-1]], err
        assert err.splitlines()[-1].startswith("imagerefl: error: "), err
        err = err.splitlines()[-1]
    return rc, err

def parse_error(capsys, *argv)->str:
    "A number refused where argparse parses it: status 2, and argparse's usage plus one error line."
    with pytest.raises(SystemExit) as e: main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]

def snapshot(folder:Path)->dict:
    "Every file under `folder` (relative name -> SHA-256): what must survive a refused command unchanged."
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

def cut(f:Path)->Path:
    "Cut a file in half, as an interrupted copy leaves it."
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2]); return f


USER_REWARDS = '''import torch
class NaNScores(torch.nn.Module):        # every score NaN
    def forward(self, images, prompts): return images.mean((1, 2, 3)) * float("nan")
class NumpyScores(torch.nn.Module):      # computed in numpy: no gradient reaches the generator
    def forward(self, images, prompts): return torch.from_numpy(images.detach().cpu().numpy().mean((1, 2, 3)))
class TwoScores(torch.nn.Module):        # two scores per image
    def forward(self, images, prompts): return images.mean((2, 3))[:, :2]
class OneNumber(torch.nn.Module):        # a Python float, not a tensor
    def forward(self, images, prompts): return 0.5
class Brightness(torch.nn.Module):       # meets the contract
    def forward(self, images, prompts): return images.mean((1, 2, 3))
'''

@pytest.fixture(scope="module")
def user_rewards(tmp_path_factory):
    "A folder holding `contract_rewards.py`, a user's module of rewards, loaded as `contract_rewards:Name` from there."
    d = tmp_path_factory.mktemp("user"); (d/"contract_rewards.py").write_text(USER_REWARDS)
    (d/"prompts.txt").write_text("a handwritten digit seven\n")
    return d

def train_args(config, out, *sets):
    return ["train", "--config", config, "--set", f"out_dir={out}", "--set", "max_steps=2", "--set", "validation.every=0",
            "--set", "batch_size=2", "--set", "data.limit=4", *[a for s in sets for a in ("--set", s)]]

# ---------------------------------------------------------------------------------------------------- 1. a user's reward
@pytest.mark.parametrize("config,reward,says", [
    ("mini_refl", "NaNScores", "reward 'contract_rewards:NaNScores' returned 2 non-finite score(s) of 2 (nan) for finite images"),
    ("mini_imagerefl", "NumpyScores", "reward 'contract_rewards:NumpyScores' returned scores without a gradient")])
def test_a_user_reward_that_breaks_the_contract_stops_training(capsys, monkeypatch, tmp_path, user_rewards, config, reward, says):
    "NaN scores are named as the reward's (not a diverged optimizer's); ImageReFL used to exit 0 on numpy scores."
    monkeypatch.chdir(user_rewards)
    (tmp_path/"runs").mkdir(); (tmp_path/"runs"/"notes.txt").write_text("mine")
    rc, err = run_main(capsys, *train_args(config, tmp_path/"runs"/"r", f"reward.name=contract_rewards:{reward}"))
    assert rc == 2 and says in err and "optimizer" not in err
    assert not (tmp_path/"runs"/"r"/"checkpoints").exists() and not (tmp_path/"runs"/"r"/"final").exists()   # no update, no export
    assert (tmp_path/"runs"/"notes.txt").read_text() == "mine"

def test_a_user_reward_that_breaks_the_contract_stops_evaluate(capsys, monkeypatch, tmp_path, user_rewards):
    "Two scores per image (a pandas traceback before) or a float: one line; the evaluation already in the folder stays."
    monkeypatch.chdir(user_rewards)
    out = tmp_path/"eval"
    ev = ["evaluate", "--model", mini_base_path(), "--prompts", user_rewards/"prompts.txt", "--images-per-prompt", "2",
          "--steps", "1", "--device", "cpu", "--out", out]
    assert run_main(capsys, *ev, "--reward", "contract_rewards:Brightness")[0] == 0
    before = {k: v for k, v in snapshot(out).items() if k != "run.json"}
    for reward, says in [("TwoScores", "returned a tensor of shape (2, 2) for 2 images: expected a float tensor of shape (2,)"),
                         ("OneNumber", "returned a float (0.5): expected a float tensor of shape (2,)")]:
        rc, err = run_main(capsys, *ev, "--reward", f"contract_rewards:{reward}")
        assert rc == 2 and f"reward 'contract_rewards:{reward}' {says}" in err
        assert {k: v for k, v in snapshot(out).items() if k != "run.json"} == before    # images, images.csv, summary.csv

# ---------------------------------------------------------------------------------------------------- 2. damaged weights
@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    "Copies of the mini base pipeline with one weights file cut in half, and an SD3 one (its T5 encoder cut)."
    from imagerefl.testing import tiny_sd3_pipeline
    d = tmp_path_factory.mktemp("damaged")
    out = {}
    for name, part in [("text_encoder", "text_encoder/model.safetensors"), ("unet", "unet/diffusion_pytorch_model.safetensors")]:
        out[name] = d/name; shutil.copytree(mini_base_path(), out[name]); cut(out[name]/part)
    tiny_sd3_pipeline().save_pretrained(d/"sd3"); cut(d/"sd3"/"text_encoder_3"/"model.safetensors"); out["sd3"] = d/"sd3"
    return out

@pytest.mark.parametrize("folder,part", [("text_encoder", "text_encoder/model.safetensors"),
                                         ("unet", "unet/diffusion_pytorch_model.safetensors"),
                                         ("sd3", "text_encoder_3/model.safetensors")])
def test_a_damaged_pipeline_folder_is_named_in_one_line(capsys, tmp_path, damaged, folder, part):
    "`sample` on a folder with a file cut short (SafetensorError with a traceback before): the file, named as damaged."
    out = tmp_path/"out"; out.mkdir(); (out/"earlier.png").write_bytes(b"png")
    rc, err = run_main(capsys, "sample", "--model", damaged[folder], "--prompt", "a digit", "--steps", "1", "--device", "cpu", "--out", out)
    assert rc == 2 and f"{damaged[folder]/part} looks damaged (cut short:" in err and "copy or download it again" in err
    assert snapshot(out) == {"earlier.png": hashlib.sha256(b"png").hexdigest()}

def test_damaged_tuned_unet_lora_and_reward_files(capsys, tmp_path):
    "A run's tuned UNet, a LoRA folder and a reward checkpoint: each damaged file named, through the same loading path."
    from imagerefl.export import load_tuned_denoiser
    from imagerefl.testing import tiny_sd_pipeline
    from imagerefl.mini.preference import PREFERENCE_FILE
    from imagerefl.mini.nets import mini_assets_dir
    from safetensors.torch import save_file
    pipe = tiny_sd_pipeline(resolution=32)
    pipe.unet.save_pretrained(tmp_path/"run"/"final"/"unet")
    f = cut(tmp_path/"run"/"final"/"unet"/"diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=f"{f} looks damaged"): load_tuned_denoiser(tmp_path/"run")
    (tmp_path/"lora").mkdir()
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 32)},
              tmp_path/"lora"/"pytorch_lora_weights.safetensors")
    f = cut(tmp_path/"lora"/"pytorch_lora_weights.safetensors")
    with pytest.raises(UserError, match=f"{f} looks damaged"): load_tuned_denoiser(tmp_path/"lora", pipe)
    r = tmp_path/PREFERENCE_FILE; shutil.copy(mini_assets_dir()/PREFERENCE_FILE, r); cut(r)
    rc, err = run_main(capsys, *train_args("mini_refl", tmp_path/"r", "reward.name=mini-preference", f"reward.path={r}"))
    assert rc == 2 and f"{r} looks damaged (cut short:" in err and not (tmp_path/"r").exists()

def test_a_damaged_checkpoint_on_resume_is_named_and_kept(capsys, tmp_path):
    "resume=latest with the only checkpoint damaged: one line naming the file; the run folder is left exactly as it was."
    from imagerefl.runfolder import write_manifest
    from safetensors.torch import save_file
    run = tmp_path/"run"; ck = run/"checkpoints"/"checkpoint-2"; ck.mkdir(parents=True)
    (run/"config.yaml").write_text("seed: 1\n"); save_file({"w": torch.ones(256)}, ck/"trainable.safetensors")
    (ck/"trainer_state.json").write_text("{}"); write_manifest(ck)
    size = (ck/"trainable.safetensors").stat().st_size; cut(ck/"trainable.safetensors")
    before = snapshot(run)
    rc, err = run_main(capsys, *train_args("mini_refl", run, "resume=latest"))
    assert rc == 2 and f"no intact checkpoint to resume from (1 damaged; {ck}: trainable.safetensors has {size // 2} bytes, {size} were written)" in err
    assert snapshot(run) == before

# ---------------------------------------------------------------------------------------------------- 3. an interrupted demo
def _interrupt_demo(out:Path, sig:int, runs:list, *extra)->tuple:
    "Start `imagerefl demo --quick` in a process, send `sig` once each of `runs` has logged a training step; (status, stderr)."
    p = subprocess.Popen([sys.executable, "-m", "imagerefl.cli", "demo", "--quick", "--out", str(out), *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    try:
        t0 = time.time()
        while not all((out/"train"/r/"train_log.csv").exists() for r in runs):
            assert p.poll() is None and time.time() - t0 < 400, "the demo ended (or took too long) before training"
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    return p.returncode, err.strip()

def test_an_interrupted_demo_stops_as_a_whole_and_the_next_run_resumes_it(tmp_path, capsys):
    "Ctrl-C while `imagerefl demo` trains: the training saves, no evaluation starts, one line says how to continue."
    out = tmp_path/"demo"
    rc, err = _interrupt_demo(out, signal.SIGINT, ["refl-seed0"])
    last = err.splitlines()[-1]
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    assert last.startswith("imagerefl: interrupted: the demo stopped (training refl-seed0 ") and \
           last.endswith(f"is kept for the next run with the same arguments; continue with: imagerefl demo --out {out} --quick")
    assert not (out/"eval").exists() and not (out/"results.csv").exists()    # no further stage ran
    from imagerefl.runfolder import find_checkpoint
    from imagerefl.mini.demo import _train_once
    ck = find_checkpoint(out/"train"/"refl-seed0"/"checkpoints", print)
    assert ck is not None and not (out/"train"/"refl-seed0"/"final").exists()
    kept = snapshot(ck)
    _train_once("mini_refl", out/"train"/"refl-seed0", DEMO_PLANS["quick"], 0)  # what the demo's next run does first
    assert f"resumed from {ck.name}" in capsys.readouterr().out
    assert (out/"train"/"refl-seed0"/"final"/"combined"/"model_index.json").exists() and snapshot(ck) == kept

@pytest.mark.slow     # about 1.5 minutes: two worker processes train
def test_sigterm_stops_a_demo_on_several_workers(tmp_path):
    "SIGTERM to the demo's process (not its workers): each worker's training saves and stops; status 143. (The full demo's default.)"
    out = tmp_path/"demo"
    rc, err = _interrupt_demo(out, signal.SIGTERM, ["refl-seed0", "imagerefl-seed0"], "--workers", "2")
    last = err.splitlines()[-1]
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    assert "training imagerefl-seed0 stopped at step" in last and last.endswith(f"continue with: imagerefl demo --out {out} --quick --workers 2")
    from imagerefl.runfolder import find_checkpoint
    for run in ("refl-seed0", "imagerefl-seed0"): assert find_checkpoint(out/"train"/run/"checkpoints", print) is not None
    assert not (out/"results.csv").exists() and not (out/"report.md").exists()

# ---------------------------------------------------------------------------------------------------- 4. numbers and files
@pytest.mark.parametrize("argv", [["demo", "--quick", "--seed", "-1"], ["mini", "preference", "--seed", "-1"],
                                  ["sample", "--model", "m", "--prompt", "a", "--seed", "-1"],
                                  ["evaluate", "--model", "m", "--prompts", "p", "--seed", "-1"]])
def test_a_seed_is_a_seed_in_every_command(capsys, tmp_path, argv):
    "`demo --seed -1` trained one run and then crashed; now every command refuses it where it is parsed, in the same words."
    (tmp_path/"d").mkdir(); (tmp_path/"d"/"demo.json").write_text('{"reward": "mini-preference"}\n')
    assert parse_error(capsys, *argv, "--out", tmp_path/"d").endswith("argument --seed: -1 is not a seed: give an integer from 0 to 4294967295")
    assert snapshot(tmp_path/"d") == {"demo.json": hashlib.sha256(b'{"reward": "mini-preference"}\n').hexdigest()}

def test_a_seed_is_a_seed_in_a_config_too(capsys, tmp_path):
    rc, err = run_main(capsys, "train", "--config", "mini_refl", "--set", "seed=-1", "--set", f"out_dir={tmp_path/'r'}")
    assert rc == 2 and err == "imagerefl: error: seed=-1 is not a seed: give an integer from 0 to 4294967295"
    assert not (tmp_path/"r").exists()
    assert "4294967296 is not a seed" in parse_error(capsys, "sample", "--model", "m", "--prompt", "a", "--out", "o", "--seed", str(2**32))

def test_an_image_size_the_model_cannot_take_is_refused_before_the_run_folder(capsys, tmp_path):
    "model.resolution: at least 8, and a multiple of 8 for the mini SD pipeline (its own input check), refused in one line before anything is written."
    for v, says in (("0", "model.resolution=0 is too small: it must be >= 8"), ("-8", "model.resolution=-8 is too small: it must be >= 8"),
                    ("12", "resolution 12 does not fit this model: use a multiple of 8 (its native size is 32)")):
        rc, err = run_main(capsys, "train", "--config", "mini_refl", "--set", f"model.resolution={v}", "--set", f"out_dir={tmp_path/v}")
        assert rc == 2 and err.endswith(says), err
        assert not (tmp_path/v).exists()
    from imagerefl.diffusion import Backbone
    from imagerefl.export import load_models
    pipe, _ = load_models("mini")
    assert Backbone(pipe, resolution=24).resolution == 24 and Backbone(pipe).resolution == 32   # a multiple of 8; None: native

def test_numbers_refused_before_anything_runs(capsys, tmp_path):
    "A negative guidance scale, a seed that leaves no room for the demo's training seeds, more steps than the scheduler has."
    assert parse_error(capsys, "sample", "--model", "m", "--prompt", "a", "--out", "o", "--guidance-scale", "-2").endswith(
        "-2 is not a guidance scale: give a number >= 0 (1: no guidance)")
    rc, err = run_main(capsys, "demo", "--seed", "4294967295", "--out", tmp_path/"d")
    k = max(DEMO_PLANS["full"].train_seeds)   # the full plan's last training seed is seed + k
    assert rc == 2 and f"the demo also trains with seed + {k}, so give at most {2**32 - 1 - k}" in err and not (tmp_path/"d").exists()
    rc, err = run_main(capsys, "sample", "--model", mini_base_path(), "--prompt", "a", "--steps", "5000", "--device", "cpu", "--out", tmp_path/"o")
    assert rc == 2 and "--steps=5000 is more than the 1000 timesteps this model's scheduler has: use at most 1000" in err
    assert not (tmp_path/"o").exists()
    rc, err = run_main(capsys, *train_args("mini_refl", tmp_path/"r", "validation.every=5", "validation.num_inference_steps=5000"))
    assert rc == 2 and "validation.num_inference_steps=5000 is more than the 1000 timesteps" in err and not (tmp_path/"r").exists()

def test_a_config_that_is_not_a_mapping(capsys, tmp_path):
    "Valid YAML, but a list: one line (an AttributeError before)."
    (tmp_path/"c.yaml").write_text("- seed: 1\n- max_steps: 2\n")
    rc, err = run_main(capsys, "train", "--config", tmp_path/"c.yaml")
    assert rc == 2 and err.endswith("c.yaml holds a YAML list, not a mapping: a config is `key: value` lines (e.g. seed: 1)")
