"The import graph: every module of imagerefl/ imports only modules before it in the data flow, lazy imports included."
import ast, re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "imagerefl"

# The data flow (docs: design.md), upstream first. A module may import, at any depth (lazy imports and
# "imagerefl.x.y:attr" / "imagerefl.x.y" strings included), only modules listed before it. A package's
# `__init__` comes after the modules it gathers. Names not present today are placeholders for other branches' modules
# (the lead places them); every module that exists must be listed.
ORDER = [
    "imagerefl",                       # __init__: the version only
    "imagerefl.core",
    "imagerefl.runfolder",
    "imagerefl.data",
    "imagerefl.diffusion",
    "imagerefl.rewards.preprocess",
    "imagerefl.rewards.registry",
    "imagerefl.rewards.clip",
    "imagerefl.rewards.imagereward",
    "imagerefl.rewards.mps",
    "imagerefl.rewards",
    "imagerefl.objectives",
    "imagerefl.switching",
    "imagerefl.sampling",
    "imagerefl.metrics",
    "imagerefl.evaluate",
    "imagerefl.config",
    "imagerefl.checkpoint",
    "imagerefl.export",
    "imagerefl.tracking",              # the training log (split from train)
    "imagerefl.train",
    "imagerefl.sweeps",
    "imagerefl.claims",
    "imagerefl.figures",
    "imagerefl.explorer",              # the ipywidgets explorer (figures and pipelines)
    "imagerefl.mini",
    "imagerefl.mini.components",
    "imagerefl.mini.data",
    "imagerefl.mini.nets",
    "imagerefl.mini.preference",
    "imagerefl.mini.pretrain",
    "imagerefl.mini.plan",             # the demo's plan, report and analysis plans (what runs and how it is judged)
    "imagerefl.mini.demo",
    "imagerefl.mini.plugin",           # the mini world's names, declared in the core registry (lazy strings)
    "imagerefl.testing",
    "imagerefl.cli",
]
SKIP = {"imagerefl._modidx"}           # nbdev's index of names: strings, never imported
ENTRY = re.compile(r"imagerefl(\.\w+)+(:[\w.]+)?")   # a lazy entry: "imagerefl.x.y" or "imagerefl.x.y:attr"

def module_name(root:Path, path:Path)->str:
    "The dotted name of the module in `path` (a package's `__init__` is the package)."
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

def modules(root:Path=ROOT)->dict:
    "Dotted name -> file of every module under `root`."
    return {m: p for p in sorted(root.rglob("*.py")) if (m := module_name(root, p)) not in SKIP}

def _resolve(name:str, known)->str|None:
    "The longest prefix of `name` that is a known module (an attribute path falls back to its module)."
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known: return ".".join(parts[:i])
    return None

def imports(path:Path, module:str, known)->list:
    "(line, target module) for every import and lazy entry of the package in the file at `path`."
    tree, out = ast.parse(path.read_text(), str(path)), []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import): names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]   # `from pkg import submodule` names the submodule
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ENTRY.fullmatch(node.value):
            names = [node.value.partition(":")[0]]
        for n in names:
            target = _resolve(n, known) if n.split(".")[0] == "imagerefl" else None
            if target and target != module: out.append((node.lineno, target))
    return out

def violations(root:Path=ROOT, order:list=ORDER)->list:
    "Each import that points down the data flow (or at an unlisted module), as `file:line module -> target`."
    mods = modules(root)
    rank = {m: i for i, m in enumerate(order)}
    out = [f"{p.relative_to(root.parent)}:1 {m} is not in ORDER: give it its place in the data flow"
           for m, p in mods.items() if m not in rank]
    for m, p in mods.items():
        for line, target in sorted(set(imports(p, m, mods))):
            if m in rank and target in rank and rank[target] >= rank[m]:
                out.append(f"{p.relative_to(root.parent)}:{line} {m} -> {target}")
    return out

def test_import_graph():
    found = violations()
    print("\n".join(found))
    assert not found, f"{len(found)} imports run against the data flow:\n" + "\n".join(found)

def test_planted_violations_are_found(tmp_path):
    pkg = tmp_path / "imagerefl"
    (pkg / "mini").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "0"\n')
    (pkg / "core.py").write_text("import os\n")
    (pkg / "data.py").write_text("from .core import *\n\ndef f():\n    from imagerefl.mini.data import g\n")
    (pkg / "metrics.py").write_text('FEATURES = dict(mini="imagerefl.mini.nets:load_features")\n')
    (pkg / "cli.py").write_text("from . import __version__\nfrom .mini import data\n")
    (pkg / "mini" / "__init__.py").write_text("")
    (pkg / "mini" / "data.py").write_text("from ..data import f\nfrom .. import cli\n")
    (pkg / "mini" / "nets.py").write_text("import imagerefl.mini.data\n")
    (pkg / "mini" / "extra.py").write_text("")
    order = ["imagerefl", "imagerefl.core", "imagerefl.data", "imagerefl.metrics", "imagerefl.mini", "imagerefl.mini.data",
             "imagerefl.mini.nets", "imagerefl.cli"]
    assert violations(pkg, order) == [
        "imagerefl/mini/extra.py:1 imagerefl.mini.extra is not in ORDER: give it its place in the data flow",
        "imagerefl/data.py:4 imagerefl.data -> imagerefl.mini.data",          # lazy, inside a function
        "imagerefl/metrics.py:1 imagerefl.metrics -> imagerefl.mini.nets",    # a lazy entry string
        "imagerefl/mini/data.py:2 imagerefl.mini.data -> imagerefl.cli"]      # `from .. import cli`
