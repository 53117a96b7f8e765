#!/usr/bin/env python3
"""Check the docs site up to Quarto (which CI cannot install): nbdev's processing of every notebook succeeds, every
`show_doc` renders, and every link between pages resolves (markdown links, the site URLs in the package and the
configs, the sidebar).   Usage: python tools/check_docs.py   (from the repository root, with the dev install)
"""
import json, os, re, sys, time
from pathlib import Path
import yaml

root = Path(__file__).resolve().parent.parent
SITE = "https://imagerefl.github.io/imagerefl/"
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")

def process(nbs:Path)->Path:
    "Run nbdev's docs processing (what `nbdev-proc-nbs` does, without its attempt to install Quarto)."
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.serve import proc_nbs
    os.chdir(root); refresh_quarto_yml()
    # nbdev warns about every hidden setup cell that imports and sets something: expected here, and noise in CI
    os.environ["PYTHONWARNINGS"] = "ignore:Found cells containing imports"
    return proc_nbs(str(nbs), n_workers=int(os.environ.get("DOCS_WORKERS", 2)), force=True)

def pages(nbs:Path)->dict:
    "Site path of every page (`10_sampling.ipynb` -> `sampling.html`) -> its source."
    from nbdev.config import nbpath2html
    return {nbpath2html(p.relative_to(nbs)).as_posix(): p for p in nbs.rglob("*") if p.suffix in (".ipynb", ".qmd", ".md")
            and not any(part.startswith((".", "_")) for part in p.relative_to(nbs).parts)}

def check_link(target:str, here:Path, nbs:Path, site:dict)->str|None:
    "None if `target` (written in the page `here`) leads to a page of the site, else why not."
    if target.startswith(SITE): rel = target[len(SITE):].split("#")[0].removesuffix(".md") or "index.html"
    elif re.match(r"^[a-z]+:", target) or target.startswith("#"): return None      # another site, or an anchor
    else:
        p = (here.parent/target.split("#")[0]).resolve()
        if not p.is_relative_to(nbs.resolve()): return None if p.exists() else f"{target}: no such file"
        if p.suffix == ".html": rel = p.relative_to(nbs.resolve()).as_posix()
        else: return None if p.exists() else f"{target}: no such file"
    return None if rel in site else f"{target}: no page {rel} (pages: {', '.join(sorted(site))})"

def main()->int:
    t0, nbs, errors = time.time(), root/"nbs", []
    try: proc = process(nbs)
    except Exception as e:
        print(f"nbdev docs processing failed: {str(e)[:2000]}"); return 1
    site, n_doc, n_links = pages(nbs), 0, 0
    for p in sorted(proc.rglob("*.ipynb")):
        rel = p.relative_to(proc)
        for c in json.loads(p.read_text())["cells"]:
            src = "".join(c["source"])
            texts = [src] if c["cell_type"] == "markdown" else []
            for o in c.get("outputs", []):
                if o.get("output_type") == "error": errors.append(f"{rel}: a cell failed: {o.get('ename')}: {o.get('evalue')}")
                texts.append("".join(o.get("data", {}).get("text/markdown", "")))
            if c["cell_type"] == "code" and re.search(r"^\s*show_doc\(", src, re.M):
                n_doc += 1
                md = "".join("".join(o.get("data", {}).get("text/markdown", "")) for o in c.get("outputs", []))
                if not re.search(r"^#{2,4} ", md, re.M): errors.append(f"{rel}: `{src.splitlines()[-1]}` rendered nothing")
            for t in texts:
                for target in LINK.findall(t):
                    if "/blob/" in target: continue          # source links into the repository
                    n_links += 1
                    if (why := check_link(target, nbs/rel, nbs, site)): errors.append(f"{rel}: broken link {why}")
    # site URLs written outside the notebooks: module docstrings, configs, bench scripts, README
    files = [*root.glob("imagerefl/**/*.py"), *root.glob("imagerefl/configs/*.yaml"), *root.glob("configs/**/*.yaml"),
             *root.glob("bench/*.py"), root/"README.md", nbs/"llms.txt"]
    for f in files:
        for url in re.findall(re.escape(SITE) + r"[\w./#-]*", f.read_text()):
            n_links += 1
            if (why := check_link(url.rstrip("."), f, nbs, site)): errors.append(f"{f.relative_to(root)}: broken link {why}")
    side = yaml.safe_load((nbs/"sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    def entries(xs):
        for x in xs: yield from (entries(x["contents"]) if isinstance(x, dict) else [x])
    listed = list(entries(side))
    errors += [f"sidebar.yml: {x} does not exist" for x in listed if not (nbs/x).exists()]
    errors += [f"sidebar.yml: {s.relative_to(nbs)} is a page but not in the sidebar" for s in site.values()
               if s.suffix == ".ipynb" and s.relative_to(nbs).as_posix() not in listed]
    for e in errors: print(e)
    print(f"docs: {len(site)} pages, {n_doc} show_doc cells, {n_links} links checked, {len(errors)} problems, "
          f"{time.time() - t0:.0f} s")
    return 1 if errors else 0

if __name__ == "__main__": sys.exit(main())
