#!/usr/bin/env python3
"""Regenerate the pictures kept in the library notebooks.

Cells flagged `#| picture` (skipped by the tests, see `tst_flags`) are run after the notebook's exported and import
cells (its tests are not run), their outputs are kept, every other output is dropped, then `nbdev-clean`.
With `--all`, every cell the tests run is run too (cells flagged notest, slow or cuda are not), and every output is
kept (stderr streams dropped): for notebooks whose examples show their results.
  python tools/render_notebooks.py                      # the notebooks that hold pictures
  python tools/render_notebooks.py nbs/10_sampling.ipynb
  python tools/render_notebooks.py --all nbs/01_runfolder.ipynb
"""
import os, re, subprocess, sys, time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
DEFAULT = ["nbs/09_objectives.ipynb", "nbs/10_sampling.ipynb", "nbs/11_metrics.ipynb", "nbs/16_train.ipynb"]
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

def render(path:Path, keep_all=False):
    import ast
    from execnb.shell import CaptureShell
    from fastcore.nbio import write_nb
    from nbdev.process import NBProcessor
    nb = NBProcessor(path, rm_directives=False, process=True).nb
    def picture(c): return c.cell_type == "code" and "picture" in c.directives_
    skipped = {"notest", "slow", "cuda"}
    def needed(c):                                       # what the pictures may rely on: definitions and imports
        if c.cell_type != "code": return False
        if keep_all: return picture(c) or not (c.directives_.keys() & skipped)
        if picture(c) or c.directives_.keys() & {"export", "exporti", "exports"}: return True
        try: tree = ast.parse(c.source)
        except SyntaxError: return False
        return any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
    t0 = time.time()
    shell = CaptureShell(path)
    os.chdir(path.parent)
    try: shell.run_all(nb, exc_stop=True, preproc=lambda c: not needed(c))
    finally: os.chdir(root)
    kept = 0
    for c in nb.cells:
        if c.cell_type != "code": continue
        if picture(c) or (keep_all and needed(c)):
            c.outputs = [o for o in c.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
            kept += sum("image/png" in o.get("data", {}) for o in c.outputs)
        else: c.outputs = []
    write_nb(nb, path)
    subprocess.run(["nbdev-clean", "--fname", str(path)], check=True)
    print(f"{path.relative_to(root)}: {kept} pictures, {time.time() - t0:.0f} s, {path.stat().st_size // 1024} KB")

if __name__ == "__main__":
    args = sys.argv[1:]
    keep_all = "--all" in args
    args = [a for a in args if a != "--all"]
    for p in args or DEFAULT: render((root/p).resolve(), keep_all=keep_all)
