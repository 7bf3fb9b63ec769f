"""The bad-input catalogue of chapter 14a, one test per row, and the command line's answer to an unwritable folder; the
safety rules (issue 8): no remote code unless asked, safetensors only, nothing unpickled or executed from data."""
import ast, inspect, json, os, re, subprocess
from pathlib import Path
import pytest
from conftest import STL_RUN
import stl_nb
from bad_input_cases import CASES, outcome, catalogue

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def test_catalogue_has_enough_rows():
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)

@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_each_bad_input_gets_its_answer(case):
    got = outcome(case)
    assert case.expect in got['message'], got
    assert got['result'] in ('rejected', 'handled', 'exit 1') or got['result'].startswith('refused: '), got
    assert 'Traceback' not in got['message']
    if got['result'] == 'rejected': assert got['message'].startswith("record 'q1', field ")

@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0, reason="root writes into read-only folders; the catalogue simulates it")
@pytest.mark.skipif(STL_RUN is None, reason="the stl_run command is not installed (pip install -e .)")
def test_cli_read_only_folder_real_chmod(tmp_path):
    "Where chmod does stop the user: a real read-only folder, the real command, one line and exit 1."
    (tmp_path/'ro').mkdir(); os.chmod(tmp_path/'ro', 0o555)
    try:
        r = subprocess.run([str(STL_RUN), '--out', str(tmp_path/'ro'/'run'),
                            '--limit', '4', '--test_limit', '2', '--rounds', '0', '--quiet'], capture_output=True, text=True, timeout=300)
    finally: os.chmod(tmp_path/'ro', 0o755)
    assert r.returncode == 1 and 'cannot write' in r.stderr and 'Traceback' not in r.stderr, r.stderr


# ---------------------------------------------------------------- safety

SRC = sorted(Path(stl_nb.__file__).parent.glob('*.py'))

def calls(tree, name):
    "The calls in `tree` to a function whose name (or attribute) is `name`."
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
            (getattr(n.func, 'id', None) == name or getattr(n.func, 'attr', None) == name)]

@pytest.mark.parametrize('path', SRC, ids=[p.name for p in SRC])
def test_nothing_unpickled_or_executed(path):
    tree = ast.parse(path.read_text(encoding='utf-8'))
    imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or '')])}
    assert not imported & {'pickle', 'dill', 'cloudpickle', 'marshal', 'shelve', 'joblib'}, imported
    for f in ('eval', 'exec', 'compile', '__import__', 'system', 'popen'):
        assert not [c for c in calls(tree, f) if isinstance(c.func, ast.Name) or f in ('system', 'popen')], f"{path.name} calls {f}"
    for c in calls(tree, 'load'):   # torch.load only with weights_only=True
        if getattr(c.func, 'value', None) is not None and getattr(c.func.value, 'id', None) == 'torch':
            assert any(k.arg == 'weights_only' and getattr(k.value, 'value', None) is True for k in c.keywords), f"{path.name}: torch.load"
    for c in calls(tree, 'from_pretrained'):   # trust_remote_code is passed on from the caller, never set True
        assert not any(k.arg == 'trust_remote_code' and getattr(k.value, 'value', None) is True for k in c.keywords), path.name
    assert not re.search(r'shell\s*=\s*True', path.read_text(encoding='utf-8')), path.name

def test_no_remote_code_by_default(monkeypatch):
    "load_vlm passes trust_remote_code=False to every from_pretrained unless the caller passes True."
    import transformers, peft
    from stl_nb.models import load_vlm
    assert inspect.signature(load_vlm).parameters['trust_remote_code'].default is False
    seen = []
    def spy(cls_name, owner):
        orig = getattr(owner, 'from_pretrained').__func__
        def f(cls, *a, **k): seen.append((cls_name, k.get('trust_remote_code', 'absent'))); return orig(cls, *a, **k)
        monkeypatch.setattr(owner, 'from_pretrained', classmethod(f))
    spy('config', transformers.AutoConfig); spy('processor', transformers.AutoProcessor)
    spy('model', transformers.LlavaForConditionalGeneration)
    load_vlm('embedded')
    assert {n for n, _ in seen} == {'config', 'processor', 'model'} and all(v is False for _, v in seen), seen

def test_shipped_model_is_safetensors():
    from stl_nb.models import _embedded_dir
    files = {p.name for p in _embedded_dir().iterdir()}
    assert 'model.safetensors' in files
    assert not [f for f in files if f.endswith(('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt', '.py'))], files
    cfg = json.loads((_embedded_dir()/'config.json').read_text())
    assert 'auto_map' not in cfg   # no custom code to trust

def test_fault_spec_is_parsed_not_executed(monkeypatch):
    "STL_FAULT, the only environment variable the library reads for behaviour, is parsed as name:n, never evaluated."
    from stl_nb.durable import fault_point, parse_faults
    monkeypatch.setenv('STL_FAULT', "__import__('os').system('false'):1")
    with pytest.raises(ValueError, match='expected name:n'): fault_point('test')
