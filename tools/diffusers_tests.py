#!/usr/bin/env python3
"""Run diffusers' own fast pipeline tests against the stock pipelines and against imagerefl's combined and AIG ones.

For each family (SD, SDXL, SD3, PixArt-α) it runs the fast test classes of diffusers' test module for that pipeline
three ways: as they are (the stock pipeline), and subclassed with `pipeline_class` set to imagerefl's combined and AIG
pipelines. The subclasses change construction only: the stock dummy components with the denoiser renamed
`original_unet` / `original_transformer`, plus `fine_tuned_unet` / `fine_tuned_transformer`, a second model of the
same config with differently seeded weights (mapped by our constructor's parameter names); the dummy inputs get the
switch in the middle of the schedule (`original_unet_steps = num_inference_steps // 2`, resp.
`original_transformer_steps`), or `aig_power=1.0` for AIG; where a test body builds the stock class by name, that name
means ours in the test's namespace, and diffusers' test tooling that looks a pipeline class up by name in
`diffusers.pipelines` finds ours there. No test body is changed.

It prints, per family and pipeline, the passed / failed / skipped counts, and every test that passes for the stock
pipeline but fails (or skips) for ours, with the first line of the error. Those that cannot pass by construction are
listed apart, with why: the test builds another pipeline class from the components or assigns `pipe.unet`; or it
compares with numbers recorded from the stock pipeline and passes in the control run, where the tuned model is a copy
of the base one guided alike (ours then reproduces the stock pipeline's numbers).

diffusers ships no tests in its wheel: point the script at a diffusers source checkout, its `tests` folder, or a git
directory of the repository (read with `git archive`); it works on a copy in a temporary folder. Use the tests of the
installed diffusers release where you can; the report says which versions met. The tests run offline
(`HF_HUB_OFFLINE=1`) on stand-ins for the two tiny hub repos they load (`hf-internal-testing/tiny-random-clip`,
`tiny-random-t5`), built into a temporary Hugging Face cache; tests that load anything else from the hub are skipped
for every pipeline. A few expected-slice tests fail for the stock pipeline with the stand-ins: what counts is the
comparison under the same stand-ins. diffusers' test modules import `parameterized` and `requests_mock` (dev extra).

Usage (from the repository root, with the dev install; imagerefl is imported from wherever PYTHONPATH / the venv
points, so `PYTHONPATH=/path/to/checkout` measures that checkout):

    python tools/diffusers_tests.py --diffusers-src ~/src/diffusers [--families sd sdxl sd3 pixart]
        [--variants stock combined aig] [--workers 2] [--out report.md] [--keep] [-k EXPR] [--tb short]

A full run takes about 15 minutes on 2 busy CPU cores with 2 workers. Exit status: 0 when every test that passes for
the stock pipeline passes for ours (apart from those that cannot by construction), 1 when some do not, 2 when there
is no measurement (bad arguments, a test module that does not import, no test ran).
"""
from __future__ import annotations
import argparse, ast, json, os, re, shutil, subprocess, sys, tempfile, time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    test_file: str   # relative to diffusers' tests/
    stock: str       # the diffusers pipeline class the tests are written for
    module: str      # imagerefl module with our classes
    combined: str
    aig: str
    denoiser: str    # "unet" or "transformer": ours take `original_<denoiser>` and `fine_tuned_<denoiser>`


FAMILIES = {
    "sd": Family("pipelines/stable_diffusion/test_stable_diffusion.py", "StableDiffusionPipeline", "imagerefl.sampling",
                 "CombinedStableDiffusionPipeline", "AIGStableDiffusionPipeline", "unet"),
    "sdxl": Family("pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py", "StableDiffusionXLPipeline",
                   "imagerefl.sampling", "CombinedStableDiffusionXLPipeline", "AIGStableDiffusionXLPipeline", "unet"),
    "sd3": Family("pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py", "StableDiffusion3Pipeline",
                  "imagerefl.sampling", "CombinedStableDiffusion3Pipeline", "AIGStableDiffusion3Pipeline",
                  "transformer"),
    "pixart": Family("pipelines/pixart_alpha/test_pixart.py", "PixArtAlphaPipeline", "imagerefl.sampling",
                     "CombinedPixArtAlphaPipeline", "AIGPixArtAlphaPipeline", "transformer"),
}
VARIANTS = ("stock", "combined", "aig")
ADAPTER_CLASS = re.compile(r"^Test(Combined|AIG)(Control)?__(\w+)$")
# class decorators and names that mark tests needing an accelerator, the hub's real checkpoints, or a night's time
NOT_FAST_DECORATORS = re.compile(r"^(slow|nightly|require_torch_accelerator|require_big_accelerator|require_torch_gpu|"
                                 r"require_torch_multi_accelerator|require_torch_multi_gpu|require_torch_neuron|"
                                 r"require_accelerate_version_greater)$")
NOT_FAST_NAMES = re.compile(r"(Integration|Slow|Nightly)")


class UsageError(Exception): pass


# ------------------------------------------------------------------------------------------------ diffusers' tests
def _version_of(init_text: str) -> str | None:
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', init_text, re.M)
    return m.group(1) if m else None


def extract_tests(src: Path, dest: Path, rev: str) -> tuple[Path, str]:
    "Copy diffusers' `tests/` from a checkout, a tests folder or a git directory into `dest`; its diffusers version."
    src = src.expanduser().resolve()
    out = dest/"tests"
    if (src/"tests"/"pipelines").is_dir() or ((src/"pipelines").is_dir() and (src/"testing_utils.py").is_file()):
        tests = src/"tests" if (src/"tests"/"pipelines").is_dir() else src
        shutil.copytree(tests, out, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        init = tests.parent/"src"/"diffusers"/"__init__.py"
        return out, (_version_of(init.read_text()) if init.is_file() else None) or "unknown"
    if src.is_dir():
        probe = subprocess.run(["git", "-C", str(src), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                               text=True)
        if probe.returncode == 0:
            commit = probe.stdout.strip()
            archive = subprocess.run(["git", "-C", str(src), "archive", commit, "tests"], capture_output=True)
            if archive.returncode != 0:
                raise UsageError(f"git archive of tests/ failed in {src}: {archive.stderr.decode().strip()}")
            subprocess.run(["tar", "x", "-C", str(dest)], input=archive.stdout, check=True)
            init = subprocess.run(["git", "-C", str(src), "show", f"{commit}:src/diffusers/__init__.py"],
                                  capture_output=True, text=True)
            return out, f"{_version_of(init.stdout) or 'unknown'} (commit {commit[:12]})"
    raise UsageError(f"--diffusers-src {src}: not a diffusers checkout, its tests/ folder, or a git directory of it")


def _decorator_name(d: ast.expr) -> str:
    d = d.func if isinstance(d, ast.Call) else d
    return d.attr if isinstance(d, ast.Attribute) else d.id if isinstance(d, ast.Name) else ""


def fast_classes(test_file: Path, stock: str) -> list[str]:
    "Names of the fast test classes of `test_file` written for the pipeline class `stock`."
    tree = ast.parse(test_file.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def sets_pipeline(node: ast.ClassDef, seen=()) -> bool:
        for stmt in node.body:
            if (isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pipeline_class"
                                                     for t in stmt.targets)
                    and isinstance(stmt.value, ast.Name) and stmt.value.id == stock):
                return True
        return any(sets_pipeline(classes[b.id], seen + (node.name,)) for b in node.bases
                   if isinstance(b, ast.Name) and b.id in classes and b.id not in seen)

    def collected(node: ast.ClassDef) -> bool:   # pytest collects Test* classes and every unittest.TestCase
        return node.name.startswith("Test") or any(ast.unparse(b) in ("unittest.TestCase", "TestCase") for b in node.bases)

    return [name for name, node in classes.items()
            if collected(node) and sets_pipeline(node) and not NOT_FAST_NAMES.search(name)
            and not any(NOT_FAST_DECORATORS.match(_decorator_name(d)) for d in node.decorator_list)]


# ------------------------------------------------------------------------------------------------ stand-in hub cache
def build_hub_cache(hf_home: Path) -> None:
    "Tiny stand-ins for the hub repos diffusers' fast tests load, in the layout of a Hugging Face cache."
    from transformers import AutoConfig, AutoTokenizer, CLIPTokenizer, T5Config
    from imagerefl.mini.components import clip_tokenizer_files
    from imagerefl.testing import tiny_t5_tokenizer

    def snapshot(repo: str) -> Path:
        folder, rev = hf_home/"hub"/f"models--{repo.replace('/', '--')}", "0" * 40
        (folder/"refs").mkdir(parents=True, exist_ok=True)
        (folder/"refs"/"main").write_text(rev)
        (folder/"snapshots"/rev).mkdir(parents=True, exist_ok=True)
        return folder/"snapshots"/rev

    # hf-internal-testing/tiny-random-clip: CLIP's BPE cut to 1000 tokens (the tests' CLIPTextConfig has
    # vocab_size=1000): the 256 bytes, the 256 bytes ending a word, the first 486 merges, then bos and eos, so eos
    # has the highest id (CLIPTextModel pools at the argmax id when eos_token_id is the legacy 2).
    with tempfile.TemporaryDirectory(prefix="imagerefl-clip-bpe-") as tmp:
        full = clip_tokenizer_files(tmp)
        vocab = json.loads((full/"vocab.json").read_text(encoding="utf-8"))
        merges = [line for line in (full/"merges.txt").read_text(encoding="utf-8").split("\n")[1:] if line]
        merges = merges[:1000 - 512 - 2]
        tokens = sorted(vocab, key=vocab.get)[:512] + ["".join(m.split()) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        assert len(set(tokens)) == 1000
        (Path(tmp)/"cut-vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                                encoding="utf-8")
        (Path(tmp)/"cut-merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        CLIPTokenizer(str(Path(tmp)/"cut-vocab.json"), str(Path(tmp)/"cut-merges.txt"),
                      model_max_length=77).save_pretrained(snapshot("hf-internal-testing/tiny-random-clip"))
    # hf-internal-testing/tiny-random-t5: that repo's T5 config (d_model 32, which the tests' transformers expect as
    # caption / joint-attention width) and a small T5-layout tokenizer whose ids stay below its vocab_size
    t5 = snapshot("hf-internal-testing/tiny-random-t5")
    tiny_t5_tokenizer(model_max_length=512).save_pretrained(t5)
    T5Config(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
             relative_attention_num_buckets=8, dropout_rate=0.1, initializer_factor=0.002, layer_norm_epsilon=1e-6,
             feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0).save_pretrained(t5)

    # offline, a missing file can silently give a 2-token tokenizer: check what the tests will get
    check = ("from transformers import AutoConfig, AutoTokenizer, CLIPTokenizer\n"
             "c = CLIPTokenizer.from_pretrained('hf-internal-testing/tiny-random-clip')\n"
             "t = AutoTokenizer.from_pretrained('hf-internal-testing/tiny-random-t5')\n"
             "cfg = AutoConfig.from_pretrained('hf-internal-testing/tiny-random-t5')\n"
             "ids = c('A painting of a squirrel eating a burger ' * 9, truncation=True).input_ids\n"
             "assert len(c) == 1000 and c.model_max_length == 77 and max(ids) == 999 == c.eos_token_id, (len(c), ids)\n"
             "assert 50 < len(t) <= cfg.vocab_size and cfg.d_model == 32, (len(t), cfg)\n")
    subprocess.run([sys.executable, "-c", check], env=_offline_env(hf_home), check=True)


def _offline_env(hf_home: Path, pythonpath: list[str] = ()) -> dict:
    env = dict(os.environ)
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "DIFFUSERS_CACHE", "HF_ENDPOINT"):
        env.pop(k, None)
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("OMP_NUM_THREADS", "1"); env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    return env


# ------------------------------------------------------------------------------------------------ generated adapters
# Written next to diffusers' test modules at run time (the relative imports of the tests need that); never committed.
ADAPTER_HELPER = r'''"""Adapts diffusers' pipeline test classes to imagerefl's combined and AIG pipelines (construction only)."""
import copy, inspect, re, types
import torch

FINE_TUNED_SEED = 1234   # the tuned denoiser: the base one's config, weights from this seed


def to_ours(components, pipeline_class, denoiser, control=False):
    """The stock dummy components for our constructor: `original_<d>`, and as `fine_tuned_<d>` a model of the same
    config with differently seeded weights (`control`: an exact copy of the base one)."""
    params = inspect.signature(pipeline_class.__init__).parameters
    assert f"original_{denoiser}" in params and f"fine_tuned_{denoiser}" in params, (pipeline_class, list(params))
    out = {}
    for name, value in components.items():
        if name == denoiser:
            out[f"original_{denoiser}"] = value
        elif name in params:
            out[name] = value
        elif value is not None:
            raise TypeError(f"{pipeline_class.__name__}.__init__ takes no `{name}`, which the test passes")
    base = components.get(denoiser)
    if base is not None:
        if control:
            tuned = copy.deepcopy(base)
        else:
            with torch.random.fork_rng(devices=[]):     # leave the global RNG where the stock construction left it
                torch.manual_seed(FINE_TUNED_SEED)
                tuned = type(base).from_config(base.config)
            if (tuned.device, tuned.dtype) != (base.device, base.dtype):
                tuned = tuned.to(device=base.device, dtype=base.dtype)
            tuned.train(base.training)
        out[f"fine_tuned_{denoiser}"] = tuned
    return out


def _rebound(function, namespace):
    "`function` reading its globals from `namespace`."
    new = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__)
    new.__kwdefaults__, new.__qualname__, new.__doc__ = function.__kwdefaults__, function.__qualname__, function.__doc__
    new.__dict__.update(function.__dict__)    # pytest marks (parametrize, skips) live there
    return new


class ImagereflAdapter:
    """Put first among the bases of a diffusers test class and set `pipeline_class` (ours), `imagerefl_stock` (the
    class the tests are written for), `imagerefl_mode` ("combined" or "aig"), `imagerefl_denoiser` ("unet" or
    "transformer") and `imagerefl_control` (True: the tuned model is a copy of the base one and guided alike, so ours
    must reproduce the stock pipeline's numbers).

    Construction only: the stock dummy components mapped to our constructor, the switch (or AIG's power) added to the
    dummy inputs, and the stock class's name, where a test body builds it by name, bound to ours in that test's
    namespace. No test body changes."""
    imagerefl_stock = imagerefl_mode = imagerefl_denoiser = None
    imagerefl_control = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        import diffusers.pipelines      # diffusers' test tooling reads a pipeline's source from there by class name
        setattr(diffusers.pipelines, cls.pipeline_class.__name__, cls.pipeline_class)
        stock, namespaces, seen = cls.imagerefl_stock, {}, set(vars(cls))
        for klass in cls.__mro__[1:]:
            for name, value in vars(klass).items():
                if name in seen:
                    continue
                seen.add(name)
                if isinstance(value, types.FunctionType) and value.__globals__.get(stock.__name__) is stock:
                    key = id(value.__globals__)
                    if key not in namespaces:
                        namespaces[key] = {**value.__globals__, stock.__name__: cls.pipeline_class}
                    setattr(cls, name, _rebound(value, namespaces[key]))

    def get_dummy_components(self, *args, **kwargs):
        return to_ours(super().get_dummy_components(*args, **kwargs), self.pipeline_class, self.imagerefl_denoiser,
                       self.imagerefl_control)

    def get_dummy_inputs(self, *args, **kwargs):
        inputs = super().get_dummy_inputs(*args, **kwargs)
        if self.imagerefl_mode == "aig":
            inputs["aig_power"] = 1.0
        else:   # the switch in the middle of the schedule
            inputs[f"original_{self.imagerefl_denoiser}_steps"] = inputs["num_inference_steps"] // 2
            if self.imagerefl_control:   # the tuned phase guided as the base one: the stock pipeline's loop
                call = inspect.signature(self.pipeline_class.__call__).parameters
                inputs["fine_tuned_guidance_scale"] = inputs.get("guidance_scale", call["guidance_scale"].default)
        return inputs


CALLS_PIPELINE = re.compile(r"(?<![\w.])([A-Z]\w*Pipeline\w*)\s*(\(|\.from_pretrained\b|\.from_pipe\b)")
RECORDED_NUMBERS = re.compile(r"\bexpected_(slice|pipe_slice|image)\s*=\s*(np|numpy|torch)\.(array|tensor)\(")
HUB_LOAD = re.compile(r"\b(from_pretrained|hf_hub_download|snapshot_download|load_image|load_numpy)\(")
REPO_ID = re.compile(r"""["']([A-Za-z0-9][\w.-]*/[\w.-]+)["']""")
STAND_INS = {"hf-internal-testing/tiny-random-clip", "hf-internal-testing/tiny-random-t5"}


def _code(source):
    return "\n".join(line.split("#")[0] for line in source.splitlines())


def by_construction(source, denoiser, rebound):
    "Why a test cannot apply to our pipeline whatever it does (None: it can), from the test's source."
    code = _code(source)
    built = sorted({m.group(1) for m in CALLS_PIPELINE.finditer(code)} - {rebound})
    if built:
        return f"builds {', '.join(built)} by name (a pipeline other than ours) from the components"
    if "_optional_components" in code and re.search(r"setattr\([^)]*,\s*None\)", code):
        return (f"sets every optional component to None, `fine_tuned_{denoiser}` among them: combined generation "
                "refuses to run without its fine-tuned model (or a LoRA adapter)")
    if re.search(rf"\.{denoiser}\s*=(?!=)", code):
        return (f"assigns `pipe.{denoiser}`, a single denoiser, where ours hold two "
                f"(`original_{denoiser}`, `fine_tuned_{denoiser}`)")
    return None


def compares_recorded_numbers(source):
    return bool(RECORDED_NUMBERS.search(_code(source)))


def needs_hub(source):
    "The hub repos a test loads that the stand-in cache does not hold."
    code = _code(source)
    return sorted(set(REPO_ID.findall(code)) - STAND_INS) if HUB_LOAD.search(code) else []
'''

CONFTEST = r'''"""imagerefl's harness: skips tests that need the hub, keeps the control classes to the tests that compare with
recorded numbers, and marks in the junit report the tests that cannot apply to our pipelines by construction."""
import inspect
import pytest
from tests.pipelines._imagerefl_adapter import (ImagereflAdapter, by_construction, compares_recorded_numbers,
                                                needs_hub)


def _source(item):
    try:
        return inspect.getsource(item.function)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        source, cls = _source(item), getattr(item, "cls", None)
        repos = needs_hub(source)
        if repos:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(repos)} from the hub (this run is offline)"))
        if cls is not None and issubclass(cls, ImagereflAdapter):
            if cls.imagerefl_control and not compares_recorded_numbers(source):
                drop.append(item)
                continue
            reason = by_construction(source, cls.imagerefl_denoiser, cls.imagerefl_stock.__name__)
            if reason:
                item.user_properties.append(("by_construction", reason))
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
'''


def adapter_module(family: Family, stock_module: str, classes: list[str], variants: list[str]) -> str:
    "Our subclasses of the stock test classes: one per pipeline of ours, and its control."
    lines = [f'"""Generated by imagerefl\'s tools/diffusers_tests.py: {family.stock} tests run against imagerefl."""',
             f"from diffusers import {family.stock}",
             f"from {family.module} import {family.combined}, {family.aig}",
             "from .._imagerefl_adapter import ImagereflAdapter",
             f"from . import {stock_module} as _stock", ""]
    for variant in variants:
        ours, tag = (family.combined, "Combined") if variant == "combined" else (family.aig, "AIG")
        for control in (False, True):
            for name in classes:
                lines += ["", f"class Test{tag}{'Control' if control else ''}__{name}(ImagereflAdapter, _stock.{name}):",
                          f"    pipeline_class = {ours}",
                          f"    imagerefl_stock = {family.stock}",
                          f"    imagerefl_mode = {variant!r}",
                          f"    imagerefl_denoiser = {family.denoiser!r}",
                          f"    imagerefl_control = {control}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Result:
    outcome: str            # passed, failed, skipped
    message: str = ""       # first line of the error or of the skip reason
    by_construction: str | None = None


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def parse_junit(path: Path, where: dict) -> dict:
    "{(family, variant, stock class, test name): Result} from pytest's junit xml; `where` maps test modules to families."
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        broken = [c for c in case if c.tag == "error" and c.get("message") == "collection failure"]
        if broken:   # a module that does not import: the whole measurement is void
            last = [line for line in (broken[0].text or "").splitlines() if line.startswith("E ")]
            raise UsageError(f"{case.get('name')} did not import: {last[-1][1:].strip() if last else 'see above'}")
        module, _, cls = case.get("classname", "").rpartition(".")
        if module not in where:
            continue
        family = where[module]
        m = ADAPTER_CLASS.match(cls)
        variant, stock_cls = (m.group(1).lower() + (" control" if m.group(2) else ""), m.group(3)) if m else ("stock", cls)
        res = Result("passed")
        for child in case:
            if child.tag in ("failure", "error"):
                # a teardown error after a failure adds a second child: keep the first
                if res.outcome != "failed":
                    res = Result("failed", _first_line(child.get("message")) or _first_line(child.text))
            elif child.tag == "skipped" and res.outcome == "passed":
                res = Result("skipped", _first_line(child.get("message")))
        for prop in case.iter("property"):
            if prop.get("name") == "by_construction":
                res.by_construction = prop.get("value")
        results[(family, variant, stock_cls, case.get("name"))] = res
    return results


def report(results: dict, families: list[str], variants: list[str], header: list[str]) -> tuple[str, int]:
    "Markdown tables of counts and of every stock-pass / ours-fail test; the number of those not by construction."
    out = [*header, "", "| family | pipeline | passed | failed | skipped |", "|---|---|---:|---:|---:|"]
    for fam in families:
        for variant in variants:
            name = {"stock": FAMILIES[fam].stock, "combined": FAMILIES[fam].combined, "aig": FAMILIES[fam].aig}[variant]
            rs = [r for (f, v, _, _), r in results.items() if f == fam and v == variant]
            count = lambda o: sum(r.outcome == o for r in rs)
            out.append(f"| {fam} | {name} | {count('passed')} | {count('failed')} | {count('skipped')} |")
    regressions, construction, gained, missing = [], [], [], []
    cell = lambda text: (text or "").replace("|", "/")
    for (fam, variant, cls, test), res in sorted(results.items()):
        if variant not in ("combined", "aig"):
            continue
        stock, control = results.get((fam, "stock", cls, test)), results.get((fam, f"{variant} control", cls, test))
        if stock is None:
            missing.append(f"{fam} {variant} {cls}::{test}")
        elif stock.outcome == "passed" and res.outcome != "passed":
            why = res.by_construction
            if not why and control is not None and control.outcome == "passed" and res.outcome == "failed":
                why = ("compares with numbers recorded from the stock pipeline; passes when the tuned model is a copy "
                       "of the base one (ours then reproduces the stock pipeline)")
            if why:
                construction.append(f"| {fam} | {variant} | `{cls}::{test}` | {cell(why)} | "
                                    f"{res.outcome}: {cell(res.message)} |")
            else:
                note = f" (control, tuned = base: {control.outcome})" if control is not None else ""
                regressions.append(f"| {fam} | {variant} | `{cls}::{test}` | {res.outcome}: {cell(res.message)}{note} |")
        elif stock.outcome != "passed" and res.outcome == "passed":
            gained.append(f"| {fam} | {variant} | `{cls}::{test}` | {stock.outcome}: {cell(stock.message)} |")
    out += ["", f"## Pass for the stock pipeline, fail or skip for ours: {len(regressions)}", ""]
    out += (["| family | ours | test | ours: first line of the error or skip reason |", "|---|---|---|---|",
             *regressions] if regressions else ["none"])
    out += ["", f"## Pass for the stock pipeline, cannot apply to ours by construction: {len(construction)}", ""]
    out += (["| family | ours | test | why it cannot apply | ours: first line of the error |", "|---|---|---|---|---|",
             *construction] if construction else ["none"])
    if gained:
        out += ["", f"## Fail or skip for the stock pipeline, pass for ours: {len(gained)}", "",
                "| family | ours | test | stock |", "|---|---|---|---|", *gained]
    if missing:
        out += ["", f"## Ran for ours only (no stock result): {len(missing)}", "", *[f"- {m}" for m in missing]]
    return "\n".join(out) + "\n", len(regressions)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-src", required=True, type=Path,
                   help="a diffusers source checkout, its tests/ folder, or a git directory of the repository")
    p.add_argument("--rev", default="HEAD", help="the commit to read when --diffusers-src is a git directory")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--workers", type=int, help="pytest-xdist processes (0: run in one process; default: 2 when "
                   "pytest-xdist is installed, else 0)")
    p.add_argument("-k", dest="keyword", help="pytest -k expression, to run a few tests while debugging")
    p.add_argument("--tb", default="no", choices=("no", "line", "short", "long"), help="pytest's traceback style")
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    p.add_argument("--workdir", type=Path, help="work here instead of a temporary folder (kept)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = p.parse_args(argv)
    if args.workers is None:
        import importlib.util
        args.workers = 2 if importlib.util.find_spec("xdist") else 0
    if "stock" not in args.variants:
        print("--variants: include stock, the comparison needs it", file=sys.stderr)
        return 2

    import diffusers, imagerefl, torch, transformers
    imagerefl_root = str(Path(imagerefl.__file__).resolve().parent.parent)
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="imagerefl-diffusers-tests-"))
    if args.workdir:
        if work.exists() and any(work.iterdir()):
            print(f"--workdir {work}: not empty", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        try:
            tests, tests_version = extract_tests(args.diffusers_src, work, args.rev)
        except UsageError as e:
            print(e, file=sys.stderr)
            return 2
        build_hub_cache(work/"hf")
        (work/"conftest.py").write_text(CONFTEST)
        (work/"pytest.ini").write_text("[pytest]\n")
        (tests/"pipelines"/"_imagerefl_adapter.py").write_text(ADAPTER_HELPER)
        ours_variants = [v for v in args.variants if v != "stock"]
        targets, where = [], {}
        for fam in args.families:
            f = FAMILIES[fam]
            test_file = tests/f.test_file
            if not test_file.is_file():
                print(f"{fam}: {f.test_file} is not in these diffusers tests", file=sys.stderr)
                return 2
            classes = fast_classes(test_file, f.stock)
            if not classes:
                print(f"{fam}: no fast test class for {f.stock} in {f.test_file}", file=sys.stderr)
                return 2
            stock_mod = ".".join(Path("tests", f.test_file).with_suffix("").parts)
            where[stock_mod] = fam
            targets += [f"tests/{f.test_file}::{c}" for c in classes]
            if ours_variants:
                adapter = test_file.with_name(f"test_zz_imagerefl_{fam}.py")
                adapter.write_text(adapter_module(f, test_file.stem, classes, ours_variants))
                where[".".join(adapter.relative_to(work).with_suffix("").parts)] = fam
                targets.append(str(adapter.relative_to(work)))
            print(f"{fam}: {', '.join(classes)}", flush=True)
        junit = work/"junit.xml"
        cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               "-o", "junit_family=xunit2", f"--junitxml={junit}", "-rN", f"--tb={args.tb}", "--disable-warnings"]
        if args.workers > 0:
            cmd += ["-n", str(args.workers), "--dist", "loadscope"]
        if args.keyword:
            cmd += ["-k", args.keyword]
        print("running:", " ".join(cmd[1:]), flush=True)
        run = subprocess.run(cmd, cwd=work, env=_offline_env(work/"hf", [imagerefl_root]))
        # pytest: 0 all passed, 1 some failed; anything else (collection errors, an interrupt) leaves no measurement
        if run.returncode not in (0, 1) or not junit.is_file():
            print(f"pytest stopped with exit status {run.returncode}: no measurement (see its output above; a missing "
                  "module is a test dependency of diffusers' to install, e.g. parameterized)", file=sys.stderr)
            return 2
        try:
            results = parse_junit(junit, where)
        except UsageError as e:
            print(f"{e} (diffusers' test dependencies: pip install parameterized requests-mock)", file=sys.stderr)
            return 2
        empty = [f"{fam} {v}" for fam in args.families for v in args.variants
                 if not any(f == fam and var == v for f, var, _, _ in results)]
        if empty and not args.keyword:
            print(f"no test ran for: {', '.join(empty)}", file=sys.stderr)
            return 2
        minutes = (time.time() - t0) / 60
        header = ["# diffusers' fast pipeline tests: stock pipelines vs imagerefl's combined and AIG", "",
                  f"- diffusers tests: {tests_version}, from `{args.diffusers_src}`",
                  f"- installed: diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
                  f"torch {torch.__version__}; imagerefl from `{imagerefl_root}`",
                  f"- device: {'cuda' if torch.cuda.is_available() else 'cpu'}; pytest workers: {args.workers or 1}; "
                  f"{minutes:.1f} min in all",
                  "- ours: the stock dummy components with the denoiser as `original_*` and a differently seeded "
                  "`fine_tuned_*`; the switch at `num_inference_steps // 2`, AIG with `aig_power=1.0`; where a test "
                  "builds the stock class by name, it builds ours",
                  "- control (tests that compare with recorded numbers only): the tuned model a copy of the base one, "
                  "`fine_tuned_guidance_scale = guidance_scale`, so ours must give the stock pipeline's numbers",
                  "- offline: tests that load other hub repos than the stand-ins are skipped for all pipelines"]
        if not tests_version.startswith(diffusers.__version__ + " ") and tests_version != diffusers.__version__:
            header.append(f"- **the tests ({tests_version}) are not those of the installed diffusers "
                          f"({diffusers.__version__})**: a test can meet a feature its release did not have, or miss one")
        text, regressions = report(results, args.families, args.variants, header)
        print("\n" + text)
        if args.out:
            args.out.write_text(text)
        return 1 if regressions else 0
    finally:
        if args.workdir or args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
