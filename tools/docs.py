#!/usr/bin/env python
"""Build the tutorial website from the notebooks, offline and without Quarto: `python tools/docs.py` writes `_site/`.

1. Every notebook of `nbs/` (index first, then the chapters in file-name order, so a new chapter appears by itself) goes
   through nbdev's own docs processors (`nbdev.processors.FilterDefaults`, what `nbdev_docs` runs before Quarto):
   `#| hide` and `#| export` cells leave, `show_doc` cells are added after every exported name, and nbdev links
   backticked names to their docs. Only export, import and `show_doc` cells are executed (to render `show_doc`); every
   other cell keeps the output stored in the notebook, so nothing is re-trained or re-generated here.
2. Quarto's jobs are then done by hand: the title cell becomes the page title, `#| echo: false` hides a cell's source,
   `#| output: asis` turns a markdown output (every `show_doc`) into part of the page, and links to `NN_name.ipynb` and to
   the published site become relative links to `name.html` (the page names Quarto uses too).
3. MkDocs (Material theme) with mkdocs-jupyter renders the processed notebooks (`execute: false`), with a sidebar in
   chapter order, search, and previous/next links.

`python tools/docs.py --out DIR` builds elsewhere; the processed notebooks and mkdocs.yml are left in `_build/docs/`.
"""
import argparse, json, os, re, shutil, subprocess, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
BUILD = ROOT/'_build'/'docs'
SITE = ROOT/'_site'

def chapters(nbs=NBS):
    "The site's notebooks in reading order: index first, then every other notebook of `nbs/` by file name."
    nbs_ = sorted(p for p in Path(nbs).glob('*.ipynb') if not p.name.startswith(('_', '.')))
    return sorted(nbs_, key=lambda p: (p.name != 'index.ipynb', p.name))

def page_name(nb_path):
    "The HTML page of a notebook, named as nbdev/Quarto name it: `00_data.ipynb` -> `data.html`."
    return re.sub(r'^\d+[a-zA-Z0-9]*_', '', Path(nb_path).name.lower()).replace('.ipynb', '.html')

def settings():
    import configparser
    cp = configparser.ConfigParser(); cp.read(ROOT/'settings.ini')
    return cp['DEFAULT']

# ---------------------------------------------------------------- 1. nbdev's processors, with a stricter "what runs" rule
def _is_pure_import(trees):
    import ast
    return all(isinstance(node, (ast.Import, ast.ImportFrom)) for t in trees for node in getattr(t, 'body', [t]))

def _procs():
    "nbdev's default docs processors, with `exec_show_docs` replaced by one that never runs a demonstration cell."
    import nbdev.processors as P
    class exec_show_docs_only(P.exec_show_docs):
        "nbdev's `exec_show_docs`, but a cell mixing imports with other code is not run (nbdev would run it and warn)."
        def __call__(self, cell):
            if not self.nb.has_docs_ or not hasattr(self, 'k') or cell.cell_type != 'code' or not cell.source: return
            trees = cell.parsed_()
            if not trees or cell.directives_.get('eval:', [''])[0].lower() == 'false': return
            run = (cell.directives_.keys() & {'export', 'exports', 'exporti', 'exec_doc'}) or P._show_docs(trees) or _is_pure_import(trees)
            if not run: return
            self.k.cell(cell)
            if self.k.exc: raise RuntimeError(f"{self.nb.path_}: cell {cell.idx_} failed while rendering show_doc:\n{cell.source}") from self.k.exc
    return [exec_show_docs_only if p is P.exec_show_docs else p for p in P.FilterDefaults().procs()]

def _split_title_cell(nb):
    "nbdev drops the whole title cell once it has read the title; keep any prose after the `> description` line."
    from execnb.nbio import mk_cell
    for i, c in enumerate(nb.cells):
        if c.cell_type != 'markdown': continue
        lines = c.source.splitlines()
        head = [l for l in lines if re.match(r'^(#\s|>\s)', l)]
        if not head or not lines[0].startswith('# '): return
        last = max(j for j, l in enumerate(lines) if re.match(r'^(#\s|>\s)', l))
        rest = '\n'.join(lines[last+1:]).strip()
        c.source = '\n'.join(lines[:last+1])
        if rest:  # after the Colab badge when there is one, so the badge sits right under the title
            j = i+2 if i+1 < len(nb.cells) and _is_badge(nb.cells[i+1]) else i+1
            nb.cells.insert(j, mk_cell(rest, 'markdown'))
        return

def _is_badge(cell): return cell.cell_type == 'markdown' and 'colab.research.google.com' in cell.source and 'badge' in cell.source

def process(nb_path):
    "Run nbdev's docs processors on one notebook (in `nbs/`, as `nbdev_docs` does); return the processed notebook."
    from execnb.nbio import read_nb
    from nbdev.process import NBProcessor
    nb = read_nb(nb_path)
    nb.path_ = str(nb_path)
    _split_title_cell(nb)
    cwd, os.environ['IN_TEST'] = os.getcwd(), '1'
    try:
        os.chdir(Path(nb_path).parent)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            NBProcessor(nb=nb, procs=_procs()).process()
    finally:
        os.chdir(cwd); os.environ.pop('IN_TEST', None)
    return nb

# ---------------------------------------------------------------- 2. what Quarto would do with the processed notebook
_re_dir = re.compile(r'^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')

def _links(md, site_url, pages):
    "Relative links: the published site's address and `NN_name.ipynb` become `name.html`."
    md = md.replace(site_url.rstrip('/') + '/', '')
    def nb_link(m):
        target, frag = m.group(2), m.group(3) or ''
        name = Path(target).name
        return f'{m.group(1)}{pages.get(name, page_name(name))}{frag})' if target == name else m.group(0)
    return re.sub(r'(\]\()([^)\s#]+\.ipynb)(#[^)\s]*)?\)', nb_link, md)

def _text(x): return ''.join(x) if isinstance(x, list) else x

def quartoish(nb, site_url, pages):
    "Turn nbdev's Quarto-bound notebook into plain Jupyter cells that any notebook renderer shows as Quarto would."
    from execnb.nbio import mk_cell
    cells = []
    for c in nb.cells:
        src = _text(c.source)
        if c.cell_type == 'raw' and src.startswith('---'):  # nbdev's front matter -> the page title and description
            import yaml
            fm = yaml.safe_load(src.strip().strip('-'))
            md = f"# {fm.get('title', '')}" + (f"\n\n> {fm['description']}" if fm.get('description') else '')
            cells.append(mk_cell(md, 'markdown')); continue
        if c.cell_type == 'markdown' and src.startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
        if c.cell_type == 'markdown':
            c.source = _links(src, site_url, pages); cells.append(c); continue
        if c.cell_type != 'code': cells.append(c); continue
        lines, opts = src.splitlines(), {}
        while lines and _re_dir.match(lines[0]):
            k, v = _re_dir.match(lines.pop(0)).groups(); opts[k] = v.strip('"\'')
        c.source = '\n'.join(lines)
        if opts.get('include') == 'false': continue
        if opts.get('output') == 'false': c.outputs = []
        if opts.get('output') == 'asis':  # markdown output becomes part of the page (every show_doc)
            mds = [_text(o['data']['text/markdown']) for o in c.get('outputs', []) if 'text/markdown' in o.get('data', {})]
            if mds:
                cells.append(mk_cell(_links('\n\n'.join(mds), site_url, pages), 'markdown')); continue
        for o in c.get('outputs', []):
            if 'text/markdown' in o.get('data', {}): o['data']['text/markdown'] = _links(_text(o['data']['text/markdown']), site_url, pages)
        if opts.get('echo') == 'false': c.metadata.setdefault('tags', []).append('remove_input')
        c.metadata.pop('has_sd', None)
        cells.append(c)
    nb.cells = cells
    return nb

# ---------------------------------------------------------------- 3. MkDocs
def nav_title(nb_path, title):
    "Sidebar label: `00 · Data` from `00_data.ipynb` titled `Data: one record ...`."
    m = re.match(r'^(\d+[a-zA-Z0-9]*)_', Path(nb_path).name)
    short = re.split(r'[:—–]', title)[0].strip()
    return f"{m.group(1)} · {short}" if m else 'Home'

def mkdocs_config(nav, cfg):
    return {
        'site_name': cfg['title'], 'site_description': cfg['description'],
        'site_url': f"{cfg['doc_host']}{cfg['doc_baseurl']}/", 'repo_url': cfg['git_url'], 'edit_uri': 'blob/main/nbs/',
        'docs_dir': 'docs', 'use_directory_urls': False, 'strict': True,
        'theme': {'name': 'material', 'font': False,  # no Google Fonts: the site reads offline
                  'features': ['navigation.footer', 'navigation.top', 'content.code.copy', 'search.highlight'],
                  'palette': [{'scheme': 'default', 'toggle': {'icon': 'material/brightness-7', 'name': 'Dark mode'}},
                              {'scheme': 'slate', 'toggle': {'icon': 'material/brightness-4', 'name': 'Light mode'}}]},
        'extra_css': ['extra.css'], 'hooks': [str(Path(__file__).resolve())],
        'markdown_extensions': ['tables', 'admonition', 'toc'],
        'plugins': ['search', {'mkdocs-jupyter': {
            'execute': False, 'include_source': True, 'include_requirejs': False, 'ignore_h1_titles': True, 'no_prompt': True,
            'remove_tag_config': {'remove_input_tags': ['remove_input']}, 'highlight_extra_classes': 'custom-css-classes'}}],
        'nav': nav,
    }

EXTRA_CSS = """/* stl_nb docs: wider content for notebook outputs, images that fit */
.md-grid { max-width: 1400px; }
.jupyter-wrapper .jp-RenderedImage img { max-width: 100%; height: auto; }
.md-typeset img { max-width: 100%; }
"""

_re_heading = re.compile(r'<h([1-6])\s+id="([^"]+)"')

def on_page_content(html, page, **kw):
    """MkDocs hook: mkdocs-jupyter's table of contents slugs a heading without its `code` (`#any-dataset`), its HTML keeps it
    (`#any-datasets-dataset`); give each contents entry the id of its heading, matched in document order."""
    flat, todo = [], list(page.toc or [])
    while todo:
        item = todo.pop(0); flat.append(item); todo[:0] = list(item.children)
    ids = [m.group(2) for m in _re_heading.finditer(html)]
    if len(ids) == len(flat):
        for item, id_ in zip(flat, ids): item.id = id_
    return html

def build(out=SITE, quiet=False):
    "Process every notebook, write the MkDocs project to `_build/docs/` and the site to `out`; return the pages."
    cfg, t0 = settings(), time.time()
    site_url = f"{cfg['doc_host']}{cfg['doc_baseurl']}/"
    if BUILD.exists(): shutil.rmtree(BUILD)
    docs = BUILD/'docs'; docs.mkdir(parents=True)
    nbs = chapters()
    pages = {p.name: page_name(p) for p in nbs}
    nav = []
    sys.path.insert(0, str(ROOT))  # this checkout's stl_nb, whatever is installed
    from execnb.nbio import write_nb
    for p in nbs:
        t = time.time()
        nb = quartoish(process(p), site_url, pages)
        title = next((_text(c.source)[2:].splitlines()[0] for c in nb.cells
                      if c.cell_type == 'markdown' and _text(c.source).startswith('# ')), p.stem)
        write_nb(nb, docs/pages[p.name].replace('.html', '.ipynb'))
        nav.append({nav_title(p, title): pages[p.name].replace('.html', '.ipynb')})
        if not quiet: print(f"  {p.name:28s} -> {pages[p.name]:20s} {time.time()-t:5.1f} s", flush=True)
    for d in (NBS/'images',):  # figures the notebooks' markdown links to
        if d.exists(): shutil.copytree(d, docs/d.name)
    (docs/'extra.css').write_text(EXTRA_CSS)
    import yaml
    (BUILD/'mkdocs.yml').write_text(yaml.safe_dump(mkdocs_config(nav, cfg), sort_keys=False, allow_unicode=True))
    out = Path(out).resolve()
    r = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '-q', '--clean', '-f', str(BUILD/'mkdocs.yml'), '-d', str(out)],
                       cwd=BUILD, capture_output=True, text=True, env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    if r.returncode:
        sys.exit(f"mkdocs build failed:\n{r.stdout}\n{r.stderr}")
    if not quiet: print(f"site in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: {len(nbs)} pages, {time.time()-t0:.0f} s")
    return [pages[p.name] for p in nbs]

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(SITE), help='folder for the site (default _site/)')
    ap.add_argument('-q', '--quiet', action='store_true')
    a = ap.parse_args(argv)
    build(a.out, a.quiet)

if __name__ == '__main__': main()
