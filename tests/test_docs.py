"""The docs site: built from the notebooks by tools/docs.py, then read in headless Chromium page by page.

Fails on a missing page, a broken internal link (page or #anchor), an image that does not load, or an error traceback in an
output. Screenshots of the landing page and of the final notebook's page are left in `_site/_artifacts/`.
Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skips, saying so, when they are absent.
"""
import functools, http.server, re, shutil, socketserver, sys, threading, time, urllib.request
from pathlib import Path
from urllib.parse import urljoin, urlsplit, unquote
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO/'tools'))
import docs  # tools/docs.py

SITE = REPO/'_site'
ARTIFACTS = SITE/'_artifacts'
CHROME_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
                '--disable-dev-shm-usage', '--window-size=1400,1100']

def _browser_paths():
    chrome = next((shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(n)), None)
    driver = shutil.which('chromedriver')
    if not chrome or not driver:
        pytest.skip("headless Chromium is not installed: `apt-get install -y chromium chromium-driver` (.ci/run does this)")
    pytest.importorskip('selenium', reason="selenium is not installed: pip install -e '.[dev]'")
    return chrome, driver

def final_notebook(nbs):
    "The page worth a screenshot besides the landing page: 11_stl (the final notebook) when it exists, else the last chapter."
    return next((p for p in nbs if p.stem == '11_stl'), nbs[-1])

@pytest.fixture(scope='module')
def site():
    "Build the site once; serve it on a free local port."
    t = time.time()
    pages = docs.build(SITE, quiet=True)
    print(f"\nsite built in {time.time()-t:.0f} s")
    handler = functools.partial(type('Quiet', (http.server.SimpleHTTPRequestHandler,), {'log_message': lambda *a: None}),
                                directory=str(SITE))
    srv = socketserver.ThreadingTCPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/", pages
    srv.shutdown(); srv.server_close()

@pytest.fixture(scope='module')
def browser():
    chrome, driver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for f in CHROME_FLAGS: opts.add_argument(f)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    b.set_page_load_timeout(60)
    yield b
    b.quit()

def test_every_notebook_has_a_page_in_sidebar_order(site):
    base, pages = site
    nbs = docs.chapters()
    assert pages == [docs.page_name(p) for p in nbs]
    assert nbs[0].name == 'index.ipynb' and [p.name for p in nbs[1:]] == sorted(p.name for p in nbs[1:])
    for page in pages:
        with urllib.request.urlopen(base + page) as r: assert r.status == 200 and r.read(), f"{page} is missing"
    nav = re.findall(r'<a href="([^"#]+)" class="md-nav__link', (SITE/'index.html').read_text())
    assert [p for p in dict.fromkeys(nav) if p.endswith('.html')] == pages, "the sidebar is not in chapter order"

PAGE_JS = """
const out = {ids: [...document.querySelectorAll('[id]')].map(e => e.id),
             links: [...document.querySelectorAll('a[href]')].map(a => a.href),
             content_links: [...document.querySelectorAll('article a[href]')].map(a => a.href),
             images: [...document.querySelectorAll('img')].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
             outputs: [...document.querySelectorAll('.jp-OutputArea-output, .jp-RenderedText')].map(o => o.innerText),
             errors: document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"] .ansi-red-fg, .jp-OutputArea-output.jp-mod-error').length,
             article: !!document.querySelector('article'), title: document.title};
return out;
"""

WAIT_JS = """const done = arguments[arguments.length-1];
Promise.all([...document.images].map(i => i.complete ? 0 : new Promise(r => {i.onload = i.onerror = r})))
  .then(() => document.fonts.ready).then(() => requestAnimationFrame(() => requestAnimationFrame(() => done(true))));"""

def _load(browser, url):
    "Open `url` and wait until its images have loaded or failed and two frames have been painted."
    browser.get(url)
    browser.execute_async_script(WAIT_JS)

TRACEBACK = re.compile(r'Traceback \(most recent call last\)')  # an error output, or one printed

def test_site_in_headless_chromium(site, browser):
    base, pages = site
    info, problems = {}, []
    for page in pages:
        _load(browser, base + page)
        info[page] = d = browser.execute_script(PAGE_JS)
        if not d['article']: problems.append(f"{page}: no page content (title {d['title']!r})")
        # the site's own images and embedded plots must load; outside ones (the Colab badge) cannot offline
        problems += [f"{page}: image does not load: {i['src'][:120]}" for i in d['images']
                     if not i['ok'] and (i['src'].startswith((base, 'data:')) or not i['src'])]
        problems += [f"{page}: error traceback in an output: {o.strip()[:200]!r}" for o in d['outputs'] if TRACEBACK.search(o)]
        if d['errors']: problems.append(f"{page}: {d['errors']} error output(s)")
    for page, d in info.items():
        for href in d['links']:
            if not href.startswith(base): continue
            u = urlsplit(href); target = unquote(u.path[len(urlsplit(base).path):]) or 'index.html'
            if target.endswith('/'): target += 'index.html'
            if not (SITE/target).is_file(): problems.append(f"{page}: broken link to {target}"); continue
            if u.fragment and target in info and u.fragment not in info[target]['ids']:
                problems.append(f"{page}: link to a missing anchor {target}#{u.fragment}")
    linked = {urlsplit(h).path.rsplit('/', 1)[-1] for h in info['index.html']['content_links'] if h.startswith(base)}
    problems += [f"index.html: the landing page (nbs/index.ipynb, its chapter table) does not link to {p}"
                 for p in pages[1:] if p not in linked]
    ARTIFACTS.mkdir(exist_ok=True)
    final = docs.page_name(final_notebook(docs.chapters()))
    for page, name in (('index.html', 'landing.png'), (final, f"final-{final.replace('.html', '')}.png")):
        _load(browser, base + page)
        time.sleep(1)  # a long page may still be painting after its load event
        browser.save_screenshot(str(ARTIFACTS/name))
    assert not problems, f"{len(problems)} problem(s) on the site:\n" + '\n'.join(sorted(set(problems))[:60])
    assert (ARTIFACTS/'landing.png').stat().st_size > 10_000

def test_notebooks_open_in_jupyterlab_with_the_python3_kernel():
    "`jupyter lab` from the dev install picks the kernel from each notebook's metadata (nbdev_clean keeps it)."
    import json
    for p in docs.chapters():
        ks = json.loads(p.read_text())['metadata'].get('kernelspec', {})
        assert ks.get('name') == 'python3' and ks.get('language') == 'python', f"{p.name}: kernelspec {ks}"
