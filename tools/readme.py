#!/usr/bin/env python3
"""README.md is rendered from nbs/index.ipynb, the docs site's landing page (nbdev's convention).

nbdev renders it with `nbdev-readme`, which needs Quarto; this does the same for an index made of markdown cells.
  python tools/readme.py                # write README.md from nbs/index.ipynb
  python tools/readme.py --check        # fail if README.md is not what nbs/index.ipynb gives (CI)
  python tools/readme.py --from-readme  # write nbs/index.ipynb from README.md (after editing or merging README.md)
"""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
index, readme = root/"nbs"/"index.ipynb", root/"README.md"

def render(nb:dict)->str:
    "The README text of an index notebook: its markdown cells, one blank line apart."
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    if code: sys.exit(f"{index} has code cells; nbs/index.ipynb must hold markdown only (or render it with nbdev-readme)")
    return "\n\n".join("".join(c["source"]).strip("\n") for c in nb["cells"] if c["cell_type"] == "markdown") + "\n"

def split(text:str)->list[str]:
    "README text cut into one chunk per `## ` section (headings inside code fences do not count)."
    chunks, cur, fence = [], [], False
    for line in text.splitlines():
        if line.startswith("```"): fence = not fence
        if line.startswith("## ") and not fence and cur: chunks.append(cur); cur = []
        cur.append(line)
    chunks.append(cur)
    return ["\n".join(c).strip("\n") for c in chunks if "\n".join(c).strip()]

def notebook(text:str)->dict:
    cells = [dict(cell_type="markdown", id=f"{i:08x}", metadata={}, source=s.splitlines(True)) for i, s in enumerate(split(text))]
    return dict(cells=cells, nbformat=4, nbformat_minor=5,
                metadata=dict(kernelspec=dict(display_name="python3", language="python", name="python3")))

if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else ""
    if arg == "--from-readme":
        index.write_text(json.dumps(notebook(readme.read_text()), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {index.relative_to(root)} from README.md")
    elif arg == "--check":
        if readme.read_text() != render(json.loads(index.read_text())):
            sys.exit("README.md is not what nbs/index.ipynb gives: edit nbs/index.ipynb and run `python tools/readme.py` "
                     "(or, if README.md is the newer one, `python tools/readme.py --from-readme`)")
        print("README.md matches nbs/index.ipynb")
    elif arg == "":
        readme.write_text(render(json.loads(index.read_text())))
        print("wrote README.md from nbs/index.ipynb")
    else: sys.exit(__doc__)
