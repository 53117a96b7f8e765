"""The paper's commands, exactly as the README, the configs and the notebooks write them (only sizes overridden), run
end to end against a stand-in hub (`tools/standin_hub.py`: tiny random-weight models and small datasets under the
real repository ids, in the layout a first online download leaves), each command once: the README's and the CLI page's
with HF_HUB_OFFLINE=1, everything else "online" with every hub call refused at once (why this split: `commands`).
And: nothing the project ships sets HF_HUB_OFFLINE."""
import json, os, re, shlex, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/"tools"))
import standin_hub  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# nothing shipped sets HF_HUB_OFFLINE

# what sets the variable: an assignment or default in Python, a notebook magic, a shell export or prefix, a YAML key.
# (`mock.patch.dict(os.environ, HF_HUB_OFFLINE="1")` in a test cell is scoped to it and restores the environment.)
SETS_OFFLINE = re.compile(r"""environ\s*\[\s*['"]HF_HUB_OFFLINE['"]\s*\]\s*=|environ\.setdefault\(\s*['"]HF_HUB_OFFLINE|"""
                          r"""putenv\(\s*['"]HF_HUB_OFFLINE|environ\.update\([^)]*HF_HUB_OFFLINE|%(set_)?env\s+HF_HUB_OFFLINE|"""
                          r"""export\s+HF_HUB_OFFLINE|^\s*!?\s*(env\s+)?HF_HUB_OFFLINE=\S+\s+\w|^\s*HF_HUB_OFFLINE\s*:""", re.M)

def shipped_files()->list[Path]:
    "What a user runs: the package, the configs, every notebook, the paper's figure scripts, the benchmarks, the README."
    files = [*ROOT.glob("imagerefl/**/*.py"), *ROOT.glob("imagerefl/**/*.yaml"), *ROOT.glob("configs/**/*.yaml"),
             *ROOT.glob("nbs/**/*.ipynb"), *ROOT.glob("paper_figures/**/*.py"), *ROOT.glob("paper_figures/**/*.ipynb"), *ROOT.glob("bench/*.py"),
             ROOT/"README.md"]
    return sorted(p for p in files if ".ipynb_checkpoints" not in p.parts and "_proc" not in p.parts)

def code_of(p:Path)->str:
    "The code of a file: a notebook's code cells, a markdown file's fenced blocks, anything else whole."
    if p.suffix == ".ipynb": return "\n".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code")
    if p.suffix == ".md": return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", p.read_text(), re.S))
    return p.read_text()

def test_nothing_shipped_sets_hf_hub_offline():
    files = shipped_files()
    assert len(files) > 60 and ROOT/"nbs"/"notebooks"/"colab_demo.ipynb" in files
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in files for m in SETS_OFFLINE.finditer(code_of(p))]
    assert offenders == [], "these set HF_HUB_OFFLINE for the user (only tests and CI may, in their own environment):\n" + "\n".join(offenders)
    # the pattern sees what the notebooks used to do, and lets reading the variable and scoped test settings pass
    for bad in ['os.environ.setdefault("HF_HUB_OFFLINE", "1")', 'os.environ["HF_HUB_OFFLINE"] = "0"', "%env HF_HUB_OFFLINE=1",
                "HF_HUB_OFFLINE=1 imagerefl train --config x", "export HF_HUB_OFFLINE=1", "env:\n  HF_HUB_OFFLINE: 1"]:
        assert SETS_OFFLINE.search(bad), bad
    for fine in ['os.environ.get("HF_HUB_OFFLINE", "0")', 'mock.patch.dict(os.environ, HF_HUB_OFFLINE="1")', "`HF_HUB_OFFLINE=1`",
                 'raise UserError(f"... is not in the local cache and HF_HUB_OFFLINE=1: download it")']:
        assert not SETS_OFFLINE.search(fine), fine

# ---------------------------------------------------------------------------------------------------------------
# the commands, as the README, the configs and the notebooks write them

def readme_blocks(lang:str)->list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT/"README.md").read_text(), re.S)

def command_lines(block:str)->list[str]:
    "The command lines of a shell block, comments and continuation lines joined."
    text = re.sub(r"\\\n\s*", "", block)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]

INSTALL = ("git clone", "pip install", "cd ")

def readme_commands()->list[str]:
    return [c for b in readme_blocks("bash") for c in command_lines(b) if not c.startswith(INSTALL) and c != "bash tools/test.sh"]

def notebook_commands(nb:Path, kind:str="GPU")->list[str]:
    "The papermill command lines a notebook's header marks with `# <kind>`."
    header = "".join(json.loads(nb.read_text())["cells"][0]["source"])
    return [re.sub(r"\s+#.*$", "", line).strip() for line in header.splitlines() if line.startswith("papermill") and line.rstrip().endswith(f"# {kind}")]

def paper_configs()->list[str]:
    "The shipped configs that run on the hub's models (the mini world's need no hub)."
    from imagerefl.config import config_names
    return [n for n in config_names() if not n.startswith("mini")]

# sizes only: one optimizer step at 64 px, a validation pass of 2 images at 4 steps, 4 steps of sampling
TRAIN_SIZES = ["max_steps=1", "batch_size=1", "gradient_accumulation_steps=1", "model.resolution=64", "data.limit=4",
               "validation.num_prompts=1", "validation.images_per_prompt=2", "validation.num_inference_steps=4",
               "validation.original_unet_steps=2", "validation.batch_size=2"]
SWEEP_SIZES = "-p num_prompts 2 -p images_per_prompt 2 -p num_inference_steps 4 -p batch_size 4"
NOTEBOOK_SIZES = {
    "train": f'-p overrides "[{", ".join(TRAIN_SIZES)}]"',                 # papermill's -p with a list, as users write it
    "combined_sweep": f'{SWEEP_SIZES} -p original_unet_steps "[0, 2, 4]"',
    "aig_sweep": f'{SWEEP_SIZES} -p aig_powers "[1, 3]"',
    "evaluate": f"{SWEEP_SIZES} -p original_unet_steps 3",
    "explorer": "-p num_inference_steps 4 -p original_unet_steps 2",
    "colab_demo": "-p world released -p device cpu -p num_inference_steps 4 -p original_unet_steps 2",   # its GPU path, on the CPU
}

def sized(cmd:str)->str:
    "`cmd` with the size overrides of its kind appended (later settings win)."
    argv = shlex.split(cmd)
    if argv[:2] == ["imagerefl", "train"]: return cmd + "".join(f" --set {s}" for s in TRAIN_SIZES)
    if argv[:2] == ["imagerefl", "sample"]: return cmd + " --steps 4 --original-unet-steps 3"
    if argv[:2] == ["imagerefl", "evaluate"]: return cmd + " --steps 4 --images-per-prompt 2 --batch-size 4"
    if argv[0] == "papermill": return cmd + " " + NOTEBOOK_SIZES[Path(argv[1]).stem]
    raise AssertionError(f"no sizes for {cmd!r}")

def readme_snippet()->str:
    "The README's Python example, on the CPU in float32 at 4 steps (it is written for a CUDA GPU)."
    blocks = readme_blocks("python")
    assert len(blocks) == 1, "the README has one Python example"
    code = blocks[0]
    for gpu, cpu in [('.to("cuda")', '.to("cpu")'), ("torch.float16", "torch.float32"),
                     ("num_inference_steps=40, original_unet_steps=30", "num_inference_steps=4, original_unet_steps=3")]:
        assert gpu in code, f"the README's example no longer has {gpu}: update the stand-in test"
        code = code.replace(gpu, cpu)
    return "python:" + code + "\nassert len(images) == 4 and images[0].size == (64, 64)\n"

CLI_EXAMPLES = {"runs/x/": "runs/sd15_hps21_imagerefl/"}     # the CLI page's placeholders

def cli_page_commands()->list[str]:
    "The `imagerefl sample` and `evaluate` examples of the CLI page (26_cli.ipynb), placeholders filled."
    text = "\n".join("".join(c["source"]) for c in json.loads((ROOT/"nbs"/"26_cli.ipynb").read_text())["cells"] if c["cell_type"] == "markdown")
    cmds = [c for b in re.findall(r"```\n(.*?)```", text, re.S) for c in command_lines(b) if c.startswith(("imagerefl sample", "imagerefl evaluate"))]
    for k, v in CLI_EXAMPLES.items(): cmds = [c.replace(k, v) for c in cmds]
    return cmds

def commands(mode:str)->list[str]:
    """Everything to run in one mode, in order (`cd DIR` changes the working directory); each command runs in one mode only.

    What the mode changes is how a hub id becomes files on disk; what runs on them (training, sampling, scoring) is the
    same. With HF_HUB_OFFLINE=1 every library reads the cache without a call, and the project's own offline branches run
    (`check_source`'s cache check, `source_file`, the processors' and rewards' `local_files_only` reads): the README's
    and the CLI page's commands, the front door, cover them (a pipeline, the released model, HPS, DINO, the prompts).
    Online, each library makes its own calls per repository and component (diffusers per pipeline class, transformers
    per tokenizer, open_clip, datasets) and must fall back to the cache at once; so every repository is loaded online:
    every other config (each backbone family, PickScore), the notebooks (ImageReward, COCO), the Colab demo (the released
    model). Running the offline commands online too (as before) repeated their training and sampling, not a new load."""
    check = ("import huggingface_hub.constants as c, os\n"
             f"assert c.HF_HUB_OFFLINE == {mode == 'offline'} and ('HF_HUB_OFFLINE' in os.environ) == {mode == 'offline'}\n")
    readme = [c for c in readme_commands() if not c.startswith("imagerefl demo")]   # the mini world needs no hub: test_demo.py runs it
    if mode == "offline": return ["python:" + check, *map(sized, readme), readme_snippet(), *map(sized, cli_page_commands())]
    trained = {shlex.split(c)[3] for c in readme if c.startswith("imagerefl train --config")}
    configs = [f"imagerefl train --config {n}" for n in paper_configs() if n not in trained]
    # the notebooks, in their own folder (their train.ipynb writes runs/sd15_hps21_imagerefl too)
    nbs = [*sorted((ROOT/"nbs"/"experiments").glob("*.ipynb"), key=lambda p: p.stem != "train"), ROOT/"nbs"/"notebooks"/"explorer.ipynb"]
    return ["python:" + check, *map(sized, configs), "cd notebooks", *[sized(c) for nb in nbs for c in notebook_commands(nb)],
            sized("papermill nbs/notebooks/colab_demo.ipynb colab.ipynb -k python3")]

def readme_trained()->list[str]:
    "The configs the README trains (offline, with the front door)."
    return [shlex.split(c)[3] for c in readme_commands() if c.startswith("imagerefl train --config")]

def test_each_command_runs_once_and_every_repository_loads_in_both_modes():
    "The two modes split the commands (none twice, none left out) and load every kind of source in each."
    off, on = commands("offline")[1:], commands("online")[1:]
    assert set(off).isdisjoint(on) and len(set(off)) == len(off) and len(set(on)) == len(on)
    assert {shlex.split(c)[3] for c in on if c.startswith("imagerefl train --config")} | set(readme_trained()) == set(paper_configs())
    assert readme_snippet() in off and any("colab_demo" in c and "world released" in c for c in on)   # the released model, both modes
    assert any("sd15_hps21_imagerefl" in c for c in off) and any("train.ipynb" in c and "sd15_hps21_imagerefl" in c for c in on)
    for name in ("hps-v2.1", "dino", "hpdv2"): assert any(name in c for c in off) and any(name in c for c in on), name

def test_the_commands_are_where_the_docs_write_them():
    "The README's front door: install with the extras pyproject defines, the two commands, train/sample, a Python example."
    import tomllib
    bash = [c for b in readme_blocks("bash") for c in command_lines(b)]
    extras = set(tomllib.loads((ROOT/"pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {e for c in bash if c.startswith("pip install -e") for e in re.findall(r'\[([a-z,]+)\]', c)[0].split(",")}
    assert named and named <= extras, (named, extras)
    assert 'pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"' in (ROOT/".ci"/"run").read_text()   # what CI installs
    assert bash.index('pip install -e ".[dev]"') > bash.index("pip install torch torchvision")                     # torch first
    assert "bash tools/test.sh" in bash and "tools/test.sh" in (ROOT/".ci"/"run").read_text()
    demo = [c for c in bash if c.startswith("imagerefl demo")]
    assert demo == ["imagerefl demo --out demo"]              # tests/test_demo.py runs it with --quick (and the full plan's units)
    from imagerefl.cli import parser, cmd_demo
    assert parser().parse_args(shlex.split(demo[0])[1:]).func is cmd_demo
    assert '"demo", "--quick", "--out"' in (ROOT/"tests"/"test_demo.py").read_text()
    assert any(c.startswith("imagerefl train --config sd15_hps21_imagerefl") for c in bash)
    assert any(c.startswith("imagerefl sample --model runs/sd15_hps21_imagerefl/final/combined") for c in bash)
    assert "ControlGenAI/ImageReFL_HPS_SD" in readme_snippet() and len(readme_blocks("python")[0].strip().splitlines()) == 5
    words = len(re.sub(r"```.*?```", "", (ROOT/"README.md").read_text(), flags=re.S).split())
    assert words <= 800, f"the README has {words} words outside code: it is a front door, move the rest to a docs page"
    for nb in [*(ROOT/"nbs"/"experiments").glob("*.ipynb"), ROOT/"nbs"/"notebooks"/"explorer.ipynb"]:
        assert notebook_commands(nb), f"{nb.name} names no GPU command in its header"
        assert Path(shlex.split(notebook_commands(nb)[0])[1]) == nb.relative_to(ROOT)

def test_every_named_repository_has_a_stand_in():
    "Every hub id the configs, notebooks, README and the library's defaults name is one of the stand-in's repositories."
    from imagerefl.config import load_config
    named = set()
    for n in paper_configs():
        cfg = load_config(n)
        named.add(cfg.model.source)
    texts = [code_of(p) for p in shipped_files() if p.suffix in (".ipynb", ".md")] + [p.read_text() for p in ROOT.glob("imagerefl/**/*.py")]
    for t in texts:
        named |= set(re.findall(r"""["'\s](stable-diffusion-v1-5/[\w.-]+|stabilityai/[\w.-]+|PixArt-alpha/[\w.-]+|ControlGenAI/[\w.-]+|"""
                                r"""xswu/[\w.-]+|THUDM/[\w.-]+|yuvalkirstain/PickScore[\w.-]*|laion/CLIP[\w.-]+|openai/clip[\w.-]+|"""
                                r"""facebook/dino[\w.-]+|ymhao/[\w.-]+|jxie/[\w.-]+)""", t))
    have = set(standin_hub.REPOS) | {"bert-base-uncased", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
    named -= {"ControlGenAI/ImageReFL"}                                   # the authors' code repository (GitHub), not a hub id
    assert named - have == set(), f"no stand-in for {sorted(named - have)}: add them to tools/standin_hub.py REPOS"

# ---------------------------------------------------------------------------------------------------------------
# running them

@pytest.fixture(scope="session")
def hub(tmp_path_factory)->Path:
    "The stand-in hub, built once for the whole session (pytest-xdist's workers share it: the build holds a file lock)."
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"): base = base.parent
    return standin_hub.build(base/"standin-hub")

def run_all(hub:Path, mode:str, work:Path)->list[dict]:
    "Run `commands(mode)` in one process started with the mode's environment, in `work` (which links to the notebooks)."
    work.mkdir(parents=True)
    (work/"notebooks").mkdir()
    for d in (work, work/"notebooks"): (d/"nbs").symlink_to(ROOT/"nbs")               # `papermill nbs/...` as written
    (work/"notebooks"/"runs").mkdir(); (work/"notebooks"/"runs"/"sd15_hps21_refl").symlink_to(work/"runs"/"sd15_hps21_refl")
    (work/"commands.json").write_text(json.dumps(commands(mode)))
    env = standin_hub.environment(hub, mode)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    before = {p for p in ("runs", "results", "eval", "samples", "demo") if (ROOT/p).exists()}
    r = subprocess.run([sys.executable, str(ROOT/"tools"/"standin_hub.py"), "execute", str(work/"commands.json"), str(work/"results.json")],
                       cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p for p in ("runs", "results", "eval", "samples", "demo") if (ROOT/p).exists()} == before, "a command wrote into the checkout"
    res = json.loads((work/"results.json").read_text())
    print("\n".join(f"{x['returncode']} {x['seconds']:6.1f} s  {x['command'][:140]}" for x in res))
    return res

def failures(res:list, work:Path)->str:
    logs = work/"results.logs"
    return "\n\n".join(f"{x['command']}\n{(logs/f'{i:02d}.log').read_text()[-2500:]}" for i, x in enumerate(res) if x["returncode"] != 0)

SCHEDULERS = {"sd3_hps21_imagerefl": "FlowMatchEulerDiscreteScheduler"}    # the others train and validate with DDPM

def check_runs(work:Path, configs:list[str]):
    "Each run exported a combined folder that carries the scheduler it trained and validated with."
    for n in configs:
        folder = work/"runs"/n/"final"/"combined"
        sched = json.loads((folder/"scheduler"/"scheduler_config.json").read_text())["_class_name"]
        assert sched == SCHEDULERS.get(n, "DDPMScheduler"), (n, sched)
        assert (work/"runs"/n/"samples"/"step-0.png").is_file()

class TestOffline:
    "HF_HUB_OFFLINE=1: the README's commands and Python example, the CLI page's examples."
    @pytest.fixture(scope="class")
    @classmethod
    def ran(cls, hub, tmp_path_factory):
        work = tmp_path_factory.mktemp("offline")/"work"
        return run_all(hub, "offline", work), work

    def test_every_command_succeeds(self, ran):
        res, work = ran
        assert all(x["returncode"] == 0 for x in res), failures(res, work)
        check_runs(work, readme_trained())
        summary = pd.read_csv(work/"eval"/"summary.csv")
        assert len(summary) and (work/"samples"/"manifest.csv").is_file()

class TestOnline:
    "No offline switch, every hub call refused at once: every other config, the notebooks and the Colab demo."
    @pytest.fixture(scope="class")
    @classmethod
    def ran(cls, hub, tmp_path_factory):
        work = tmp_path_factory.mktemp("online")/"work"
        return run_all(hub, "online", work), work

    def test_every_command_succeeds(self, ran):
        res, work = ran
        assert all(x["returncode"] == 0 for x in res), failures(res, work)
        check_runs(work, [n for n in paper_configs() if n not in readme_trained()])
        nb = work/"notebooks"
        check_runs(nb, ["sd15_hps21_imagerefl"])                                  # train.ipynb -p config sd15_hps21_imagerefl
        assert pd.read_csv(nb/"results"/"sd15_imagerefl_combined"/"results.csv").original_unet_steps.tolist() == [0, 2, 4]
        assert pd.read_csv(nb/"results"/"sd15_refl_aig"/"results.csv").aig_power.tolist() == [1.0, 3.0]
        row = pd.read_csv(nb/"results"/"sd15_imagerefl_k30"/"results.csv")
        assert row.reward_mean.notna().all() and {"reward_pickscore_mean", "reward_imagereward_mean"} <= set(row.columns)
        assert (nb/"colab.ipynb").is_file() and "released world on cpu" in (nb/"colab.ipynb").read_text()

    def test_no_hub_call_waited(self, ran):
        "A warm cache answers at once: no library retried a refused call (what a file missing from the stand-in causes, ~23 s each)."
        res, work = ran
        assert [(x["command"][:80], x["hub_retries"]) for x in res if x["hub_retries"]] == []
