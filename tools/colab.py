#!/usr/bin/env python
"""Give every notebook an "Open in Colab" badge and a Colab set-up cell, right under its title: `python tools/colab.py`.

Idempotent: the two cells are found by their ids (`colab-badge`, `colab-setup`), replaced by the current version and
moved under the title, so rerunning it after a merge or on a new chapter is safe; nothing else in a notebook changes.
`python tools/colab.py --check` exits 1 when a notebook lacks them or has an old version (tools/test.sh runs it).
`python tools/colab.py nbs/12_x.ipynb` does one notebook.

The set-up cell is `#| hide` (not on the docs site, not in README.md) and does nothing outside Colab, so `nbdev_test`
and local runs are unaffected. In Colab it installs the package from the repository (`settings.ini`'s `git_url`) and
says whether a GPU is attached: the embedded default runs on the CPU, real models want a T4 runtime or better.
"""
import configparser, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
BADGE_ID, SETUP_ID = 'colab-badge', 'colab-setup'

def _cfg():
    cp = configparser.ConfigParser(); cp.read(ROOT/'settings.ini')
    return cp['DEFAULT']

def colab_url(nb_name, cfg=None):
    "The notebook in Colab, from settings.ini's `git_url` and `branch`: github.com/ORG/REPO -> colab.../github/ORG/REPO/blob/..."
    cfg = cfg or _cfg()
    repo = cfg['git_url'].rstrip('/').removesuffix('.git').split('github.com/')[-1]
    return f"https://colab.research.google.com/github/{repo}/blob/{cfg.get('branch', 'main')}/{cfg.get('nbs_path', 'nbs')}/{nb_name}"

def badge_source(nb_name, cfg=None):
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(nb_name, cfg)})"

def setup_source(cfg=None):
    cfg = cfg or _cfg()
    return f'''#| hide
# Colab only (does nothing elsewhere): install stl_nb from its repository, then check for a GPU.
import sys
if 'google.colab' in sys.modules:
    import subprocess
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', 'stl_nb @ git+{cfg['git_url']}'], check=True)
    import torch
    print('GPU:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else
          'none. The embedded default runs on this CPU; for real models choose Runtime > Change runtime type > T4 GPU.')'''

def _lines(s):
    "nbformat's list-of-lines form, as nbdev_clean writes it."
    ls = s.splitlines(keepends=True)
    return ls

def cells_for(nb_name, cfg=None):
    return [{'cell_type': 'markdown', 'id': BADGE_ID, 'metadata': {}, 'source': _lines(badge_source(nb_name, cfg))},
            {'cell_type': 'code', 'execution_count': None, 'id': SETUP_ID, 'metadata': {}, 'outputs': [],
             'source': _lines(setup_source(cfg))}]

def _src(c): return ''.join(c['source']) if isinstance(c['source'], list) else c['source']

def _is_ours(c):
    return c.get('id') in (BADGE_ID, SETUP_ID) or (c['cell_type'] == 'markdown' and 'colab-badge.svg' in _src(c))

def apply(nb, nb_name, cfg=None):
    "The notebook with our two cells, fresh, right after its title cell (a first markdown cell starting `# `), or first."
    cells = [c for c in nb['cells'] if not _is_ours(c)]
    at = 1 if cells and cells[0]['cell_type'] == 'markdown' and _src(cells[0]).lstrip().startswith('# ') else 0
    return {**nb, 'cells': cells[:at] + cells_for(nb_name, cfg) + cells[at:]}

def dumps(nb): return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + '\n'

def notebooks(): return sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))

def main(argv):
    check = '--check' in argv
    paths = [Path(a) for a in argv if not a.startswith('--')] or notebooks()
    cfg, stale = _cfg(), []
    for p in paths:
        text = p.read_text()
        new = dumps(apply(json.loads(text), p.name, cfg))
        if new == text: continue
        stale.append(p)
        if not check: p.write_text(new)
    if check:
        if stale:
            print("no or old Colab badge/set-up cell in: " + ', '.join(p.name for p in stale) + "; run `python tools/colab.py`")
            return 1
        print(f"Colab cells up to date in {len(paths)} notebooks")
    elif stale: print("Colab cells written to " + ', '.join(p.name for p in stale))
    return 0

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
