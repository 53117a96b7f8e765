"The training run folder: changed-config resume, lock, finished runs, damaged checkpoints, exploding weights, a second Ctrl-C."
import os, json, signal, socket
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest, torch
from safetensors.torch import load_file
from imagerefl.core import UserError
from imagerefl.testing import tiny_sd_pipeline
from imagerefl.diffusion import Backbone
from imagerefl import train as T
from imagerefl.train import Trainer
from imagerefl.data import PromptDataset
from imagerefl.config import load_config
from imagerefl.testing import FixedNoiseObjective, Brightness

PROMPTS = [f"prompt {i}" for i in range(8)]

def cfg(out, *over):
    base = dict(out_dir=str(out), mixed_precision="no", log_with="none", max_steps=3, batch_size=2, gradient_accumulation_steps=1,
                checkpoint_every=1, keep_checkpoints=2, export=False, validation=dict(every=0),
                model=dict(scheduler="ddim", gradient_checkpointing=False), optimizer=dict(name="adam", lr=1e-3),
                objective=dict(name="refl", num_inference_steps=6, min_mid_index=3, max_mid_index=6))
    return load_config(base, list(over))

def trainer(out, *over, objective=None, val_prompts=None):
    bb = Backbone(tiny_sd_pipeline(resolution=32), scheduler="ddim", num_inference_steps=6)
    return Trainer(cfg(out, *over), bb, objective or FixedNoiseObjective(), Brightness(), PromptDataset(PROMPTS), val_prompts)

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    "A finished 3-step run (checkpoints 2 and 3) and its final weights."
    out = tmp_path_factory.mktemp("run")
    tr = trainer(out); r = tr.fit(report=False)
    assert r["status"] == "finished"
    return out, {n: p.detach().clone() for n, p in tr.named_trainable().items()}

def copy_run(src, dst):
    import shutil; shutil.copytree(src, dst); return dst

def test_resume_with_changed_config_is_refused_before_anything_is_written(finished, tmp_path, capsys):
    out = copy_run(finished[0], tmp_path/"run")
    before = (out/"config.yaml").read_text()
    with pytest.raises(UserError, match=r"cannot resume with a changed batch_size \(2 -> 4\), optimizer.lr \(0.001 -> 5e-05\)"):
        trainer(out, "resume=latest", "optimizer.lr=5e-5", "batch_size=4").fit()
    assert (out/"config.yaml").read_text() == before                     # a refused resume writes nothing
    tr = trainer(out, "resume=latest", "max_steps=4", "log_every=2")      # allowed changes
    r = tr.fit()
    assert r["status"] == "finished" and r["step"] == 4
    said = capsys.readouterr().out
    assert "resumed from checkpoint-3 (step 3); log_every: 10 -> 2; max_steps: 3 -> 4" in said
    assert "max_steps: 4" in (out/"config.yaml").read_text()
    assert tr.optimizer.param_groups[0]["lr"] == 1e-3                    # the LR config.yaml names
    assert [e["event"] for e in json.loads((out/"provenance.json").read_text())] == ["start", "resume"]

def test_new_run_over_a_finished_run_with_pruned_checkpoints_is_refused(finished, tmp_path):
    out = copy_run(finished[0], tmp_path/"run")
    import shutil; shutil.rmtree(out/"checkpoints")
    log = (out/"train_log.csv").read_text()
    with pytest.raises(UserError, match="already holds a run .*resume=latest to continue it, or choose another out_dir"):
        trainer(out).fit()
    with pytest.raises(UserError, match="holds a run .* but no intact checkpoint"):     # never a silent restart from 0
        trainer(out, "resume=latest").fit()
    assert (out/"train_log.csv").read_text() == log

def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path, capsys):
    (tmp_path/".lock").write_text(json.dumps(dict(pid=os.getppid(), host=socket.gethostname(), since="now")))
    with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getppid()}"): trainer(tmp_path).fit()
    assert not (tmp_path/"config.yaml").exists()
    import subprocess, sys
    gone = subprocess.Popen([sys.executable, "-c", "pass"]); gone.wait()
    (tmp_path/".lock").write_text(json.dumps(dict(pid=gone.pid, host=socket.gethostname(), since="then")))
    assert trainer(tmp_path, "max_steps=1").fit()["status"] == "finished"
    assert f"took over a stale lock (pid {gone.pid}" in capsys.readouterr().out
    assert not list(tmp_path.glob(".lock*"))                             # released at the end, nothing left behind

def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(finished, tmp_path, capsys):
    out = copy_run(finished[0], tmp_path/"run")
    w = out/"checkpoints"/"checkpoint-3"/"trainable.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])                # truncated
    tr = trainer(out, "resume=latest"); r = tr.fit()
    said = capsys.readouterr().out
    assert "checkpoint-3: trainable.safetensors has" in said and "resumed from checkpoint-2 (step 2)" in said
    assert r["status"] == "finished" and r["step"] == 3
    assert all(torch.equal(p, finished[1][n]) for n, p in tr.named_trainable().items())   # the same end point, exactly
    out2 = copy_run(finished[0], tmp_path/"run2")
    for s in (2, 3): (out2/"checkpoints"/f"checkpoint-{s}"/"trainer_state.json").write_text("{broken")
    with pytest.raises(UserError, match="no intact checkpoint"): trainer(out2, "resume=latest").fit()

def test_weights_made_non_finite_by_an_update_are_restored_and_never_named_good(tmp_path, capsys):
    class Steep(FixedNoiseObjective):                                      # finite gradients (~1e15) ...
        def __call__(self, *a, **k): loss, logs = super().__call__(*a, **k); return loss * 1e15, logs
    tr = trainer(tmp_path, "optimizer.name=sgd", "optimizer.lr=1e30", "max_bad_steps=2", objective=Steep())  # ... x lr = inf
    w0 = {n: p.detach().clone() for n, p in tr.named_trainable().items()}
    r = tr.fit()
    assert (r["status"], r["step"], r["skipped_updates"]) == ("diverged", 0, 2)
    assert all(torch.equal(p, w0[n]) for n, p in tr.named_trainable().items())          # restored, finite
    assert "non-finite loss, gradient or weights" in r["message"] and r["message"].endswith("is none; lower optimizer.lr or set optimizer.max_grad_norm")
    assert capsys.readouterr().out.count("stopped:") == 1

def test_second_ctrl_c_during_a_checkpoint_save_finishes_the_save(tmp_path, monkeypatch):
    class SigintAtSecondCall(FixedNoiseObjective):
        def __call__(self, *a, **k):
            out = super().__call__(*a, **k)
            if self.calls == 2: signal.raise_signal(signal.SIGINT)        # Ctrl-C during step 2
            return out
    save_state = T.save_state
    def ctrl_c_again(*a, **k):                                           # Ctrl-C again while the checkpoint is written
        signal.raise_signal(signal.SIGINT); return save_state(*a, **k)
    monkeypatch.setattr(T, "save_state", ctrl_c_again)
    r = trainer(tmp_path, "checkpoint_every=0", "max_steps=5", objective=SigintAtSecondCall()).fit()
    assert r["status"] == "interrupted" and r["step"] == 2
    from imagerefl.runfolder import verify_checkpoint
    assert verify_checkpoint(tmp_path/"checkpoints"/"checkpoint-2") is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

def test_push_to_hub_writes_the_card_and_uploads_final_combined(tmp_path, monkeypatch, capsys):
    calls = []
    class FakeApi:                                                       # the upload itself, offline
        def create_repo(self, repo_id, **kw): calls.append(("create", repo_id, kw))
        def upload_folder(self, **kw): calls.append(("upload", sorted(p.name for p in Path(kw["folder_path"]).iterdir()), kw))
    import imagerefl.export
    monkeypatch.setattr(imagerefl.export, "HfApi", FakeApi)              # where the export reaches huggingface_hub
    (tmp_path/"val.txt").write_text("a cat\na dog\n")
    tr = trainer(tmp_path/"run", "max_steps=1", "model.lora_rank=2", "export=true", "push_to_hub=true", "hub_model_id=me/tiny",
                 "validation.every=1", f"validation.prompts={tmp_path/'val.txt'}", "validation.num_prompts=2",
                 "validation.images_per_prompt=1", "validation.num_inference_steps=2", "validation.original_unet_steps=1",
                 val_prompts=["a cat", "a dog"])
    assert tr.fit()["status"] == "finished"
    folder = tmp_path/"run"/"final"/"combined"
    assert calls[0] == ("create", "me/tiny", dict(private=False, exist_ok=True))
    assert calls[1][0] == "upload" and calls[1][2]["repo_id"] == "me/tiny" and calls[1][2]["folder_path"] == str(folder)
    assert {"README.md", "validation.png", "model_index.json", "original_unet", "fine_tuned_unet"} <= set(calls[1][1])
    card = (folder/"README.md").read_text()
    for text in ["**refl**", "reward **hps-v2.1**", "CombinedStableDiffusionPipeline.from_pretrained(\"me/tiny\")",
                 "original_unet_steps=1", "![validation grid](validation.png)", "lora_rank: 2", "LoRA rank 2"]:
        assert text in card, text
    assert "uploaded" in capsys.readouterr().out
    with pytest.raises(UserError, match="push_to_hub needs export: true and hub_model_id"): cfg(tmp_path, "push_to_hub=true")

def test_cli_prints_a_divergence_once(tmp_path, capsys):
    from imagerefl.cli import main
    rc = main(["train", "--config", "mini_refl", "--set", f"out_dir={tmp_path}", "--set", "max_steps=3", "--set", "batch_size=2",
               "--set", "data.limit=4", "--set", "validation.every=0", "--set", "checkpoint_every=1",
               "--set", "objective.num_inference_steps=4", "--set", "objective.min_mid_index=2", "--set", "objective.max_mid_index=4",
               "--set", "optimizer.lr=1e30", "--set", "max_bad_steps=1"])
    out, err = capsys.readouterr()
    assert rc == 2 and (out + err).count("stopped: 1 updates in a row") == 1 and "imagerefl: error: stopped:" in err
    assert "from before step 1) is none" in err                           # checkpoint-1's weights (~1e30) are not named good
    w = load_file(tmp_path/"checkpoints"/"checkpoint-1"/"trainable.safetensors")
    assert max(t.abs().max().item() for t in w.values()) > 1e20             # there, finite, exploded

def test_resume_latest_without_a_run_says_it_starts_a_new_one(tmp_path, capsys):
    r = trainer(tmp_path/"new", "resume=latest", "max_steps=1").fit()
    assert r["status"] == "finished" and r["step"] == 1
    assert f"resume=latest: {tmp_path/'new'} holds no checkpoint yet, so this is a new run" in capsys.readouterr().out
