"""`pip install .` gives a wheel with the library and the embedded model and nothing else big; from it, in a fresh virtual
environment, `import stl_nb` is quick (no torch, transformers, peft, datasets or matplotlib at package import) and
`stl_run --help` works.

The fresh environment borrows this one's third-party packages through a .pth file (so nothing is downloaded), but
stl_nb itself comes only from the wheel. About 30 s; marked `wheel` (`pytest -m "not wheel"` leaves it out).
"""
import os, shutil, subprocess, sys, sysconfig, time, zipfile
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ('torch', 'transformers', 'peft', 'datasets', 'matplotlib', 'bitsandbytes', 'accelerate', 'pandas')
pytestmark = pytest.mark.wheel

def _run(*cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r

def _can_build_offline():
    try:
        import setuptools
        return int(setuptools.__version__.split('.')[0]) >= 64
    except ImportError: return False

@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    "Build the wheel from a copy of the working tree's files (not from stale build/ leftovers)."
    tmp = tmp_path_factory.mktemp('wheel')
    files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split('\0')
    src = tmp/'src'
    for f in filter(None, files):
        if (REPO/f).is_file():
            (src/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(REPO/f, src/f)
    t = time.time()
    iso = ['--no-build-isolation'] if _can_build_offline() else []
    _run(sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', *iso, '-w', tmp/'dist', src, cwd=tmp)
    whl, = (tmp/'dist').glob('stl_nb-*.whl')
    print(f"\nwheel {whl.name}: {whl.stat().st_size/1e6:.1f} MB, built in {time.time()-t:.0f} s")
    return whl

def test_wheel_holds_the_library_and_the_embedded_model_only(wheel):
    with zipfile.ZipFile(wheel) as z: infos = {i.filename: i for i in z.infolist()}
    pkg = {n for n in infos if not n.startswith('stl_nb-')}  # leave out the .dist-info folder
    assert all(n.startswith('stl_nb/') for n in pkg), sorted(n for n in pkg if not n.startswith('stl_nb/'))
    modules = {f"stl_nb/{p.name}" for p in (REPO/'stl_nb').glob('*.py')}
    assets = {f"stl_nb/{p.relative_to(REPO/'stl_nb').as_posix()}" for p in (REPO/'stl_nb'/'assets').rglob('*') if p.is_file()}
    assert modules <= pkg, f"modules missing from the wheel: {sorted(modules - pkg)}"
    assert assets <= pkg, f"embedded model files missing from the wheel: {sorted(assets - pkg)}"
    assert 'stl_nb/assets/embedded/model.safetensors' in pkg
    assert pkg <= modules | assets, f"unexpected files in the wheel: {sorted(pkg - modules - assets)}"
    big = {n: i.file_size for n, i in infos.items() if i.file_size > 1_000_000 and not n.startswith('stl_nb/assets/')}
    assert not big, f"big files outside the embedded model: {big}"
    assert wheel.stat().st_size < 10_000_000, f"wheel is {wheel.stat().st_size/1e6:.1f} MB"

@pytest.fixture(scope='module')
def venv(wheel, tmp_path_factory):
    "A fresh venv with the wheel installed (--no-deps); third-party packages are borrowed from this environment."
    d = tmp_path_factory.mktemp('venv')/'v'
    _run(sys.executable, '-m', 'venv', '--without-pip', d)
    py = d/'bin'/'python'
    site = Path(_run(py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])').stdout.strip())
    # a plain path line: the borrowed folder's own .pth files (this checkout's editable stl_nb) are not read
    (site/'zz_borrowed.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    _run(sys.executable, '-m', 'pip', '--python', py, 'install', '-q', '--no-deps', '--no-index', wheel)
    return d

def test_import_is_light_and_from_the_wheel(venv, tmp_path):
    code = (f"import sys, time; t = time.perf_counter(); import stl_nb; dt = time.perf_counter() - t; "
            f"print(stl_nb.__file__); print(dt); print([m for m in {HEAVY!r} if m in sys.modules])")
    out = _run(venv/'bin'/'python', '-c', code, cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(str(venv)), f"stl_nb was imported from {out[0]}, not from the wheel"
    assert out[2] == '[]', f"import stl_nb pulls in {out[2]}"
    assert float(out[1]) < 1.0, f"import stl_nb took {float(out[1]):.2f} s"

def test_stl_run_help_from_the_wheel(venv, tmp_path):
    t = time.time()
    r = _run(venv/'bin'/'stl_run', '--help', cwd=tmp_path)
    print(f"\nstl_run --help: {time.time()-t:.1f} s")
    assert 'usage: stl_run' in r.stdout and '--method' in r.stdout
    assert not list(tmp_path.iterdir()), "stl_run --help wrote files"
    assert (venv/'bin'/'stl_compare').exists() and (venv/'bin'/'stl_demo').exists()
