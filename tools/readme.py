#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which may be missing).

`python tools/readme.py` writes README.md; `python tools/readme.py --check` exits 1 when README.md is stale.
Markdown cells are copied, code cells become ```python blocks followed by their text output,
and cells marked `#| hide` are left out, as nbdev's own renderer does.
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- WARNING: generated from nbs/index.ipynb by tools/readme.py; edit the notebook, not this file -->\n\n"

def _src(cell): return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']

def _directives(src): return [l[3:].strip() for l in src.splitlines() if l.startswith('#|')]

def _outputs(cell):
    out = []
    for o in cell.get('outputs', []):
        if o['output_type'] == 'stream': out.append(''.join(o['text']))
        elif 'data' in o:
            d = o['data']
            if 'text/markdown' in d: out.append(('MD', ''.join(d['text/markdown'])))
            elif 'image/png' in d: continue
            elif 'text/plain' in d: out.append(''.join(d['text/plain']))
    return out

def render(nb_path=ROOT/'nbs'/'index.ipynb'):
    nb = json.loads(Path(nb_path).read_text())
    parts = []
    for cell in nb['cells']:
        src = _src(cell)
        dirs = _directives(src)
        if any(d.startswith('hide') for d in dirs): continue
        if cell['cell_type'] == 'markdown':
            parts.append(src.strip())
        elif cell['cell_type'] == 'code':
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
            if code and not any(d.startswith('hide_input') or d == 'echo: false' for d in dirs):
                parts.append(f"```python\n{code}\n```")
            for o in _outputs(cell):
                if isinstance(o, tuple): parts.append(o[1].strip())
                elif o.strip(): parts.append(f"```\n{o.rstrip()}\n```")
    text = '\n\n'.join(p for p in parts if p)
    # links are relative to nbs/ in the notebooks (and the docs site); README.md sits one folder up
    text = re.sub(r'\]\((?!https?:|#|/)([^)]+)\)', lambda m: f'](nbs/{m.group(1)})', text)
    return HEADER + text + '\n'

def main(argv):
    text, readme = render(), ROOT/'README.md'
    if '--check' in argv:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is stale: run `python tools/readme.py` (it is generated from nbs/index.ipynb)")
            return 1
        print("README.md matches nbs/index.ipynb")
        return 0
    readme.write_text(text)
    return 0

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
