"""Crash and resume, and reproducibility (issue 8): `stl_run` killed with SIGKILL at each crash point of chapter 04a and rerun
ends with the files of an uninterrupted run; two runs of one config and seed are byte-identical apart from timings."""
import os, signal, subprocess
from pathlib import Path
import pytest
from stl_nb.loop import tiny_config, write_json, read_json
from stl_nb.generate import GenConfig, read_records, record_key
from stl_nb.train import embedded_train_config
from stl_nb.models import _embedded_dir
from conftest import STL_RUN

pytestmark = [pytest.mark.skipif(not (_embedded_dir()/'config.json').exists(), reason="the embedded model is not built (chapter 04)"),
              pytest.mark.skipif(STL_RUN is None, reason="the stl_run command is not installed (pip install -e .)")]
TIMING = {'seconds', 'tokens_per_s'}   # the only fields two runs of one config may disagree on,
WHERE = {'out', 'adapter_dir'}          # besides the absolute paths of the run's folder


def crash_config():
    "The tiny config cut further (~20 s a run): 16 training and 8 test questions, one round, batches of 4 so each stage has several."
    return tiny_config(limit=16, test_limit=8, rounds=1,
                       gen=GenConfig(max_new_tokens=96, batch_size=4, temperature=0.7),   # sampled: seeding must survive a crash
                       eval_gen=GenConfig(max_new_tokens=96, batch_size=4),
                       train=embedded_train_config(batch_size=8, logging_steps=1))         # a few optimizer steps

def stl_run(cfg_file, out, fault=None):
    "Run the command as a user would, in a fresh process; `fault` sets STL_FAULT."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'STL_FAULT': fault or ''}
    return subprocess.run([str(STL_RUN), '--config', str(cfg_file), '--out', str(out), '--quiet'], env=env,
                          capture_output=True, text=True, timeout=300)

def untimed(x):
    "`x` without timing fields and the run's folder."
    if isinstance(x, dict): return {k: untimed(v) for k, v in x.items() if k not in TIMING | WHERE}
    return [untimed(v) for v in x] if isinstance(x, list) else x

def contents(run) -> dict:
    "{relative path: comparable content} of every file of a finished run: bytes, or JSON without timings; report and figures aside."
    out = {}
    for p in sorted(Path(run).rglob('*')):
        rel = str(p.relative_to(run))
        if not p.is_file() or rel == 'report.md' or rel.startswith('plots/'): continue
        out[rel] = untimed(read_json(p)) if p.suffix == '.json' and p.parent.name != 'adapter' else p.read_bytes()
    return out

def assert_same_run(a, b):
    "Two finished runs with the same files and contents, every JSONL holding each record once and none missing."
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb)
    for f in ca:
        if f.endswith('.jsonl'):
            ka, kb = [record_key(r) for r in read_records(Path(a)/f)], [record_key(r) for r in read_records(Path(b)/f)]
            assert len(set(ka)) == len(ka) and sorted(ka) == sorted(kb), f"{f}: duplicate or missing records"
        assert ca[f] == cb[f], f"{f} differs"
    assert not list(Path(a).rglob('*.tmp')) and not list(Path(a).rglob('trainer'))

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "The config file and an uninterrupted run of it."
    d = tmp_path_factory.mktemp('crash')
    write_json(d/'config.json', crash_config().to_dict())
    r = stl_run(d/'config.json', d/'reference')
    assert r.returncode == 0, r.stderr[-2000:]
    return d


def test_same_seed_same_files(runs):
    "A second run of the same config and seed, in another folder and process: identical rationales, adapters and metrics."
    r = stl_run(runs/'config.json', runs/'again')
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(runs/'again', runs/'reference')
    m = lambda d: untimed(read_json(d/'metrics.json'))
    assert m(runs/'again') == m(runs/'reference') and len(m(runs/'reference')['rounds']) == 2


# Each kill is a fresh process with its own STL_FAULT (hits count per process); the next command resumes where it died.
# (point, what the folder must show right after the kill)
KILLS = [
    ('positives:2',    lambda d: len(read_records(d/'round_1'/'positives.jsonl')) == 8),
    ('negatives:1',    lambda d: 0 < len(read_records(d/'round_1'/'negatives.jsonl'))),
    ('train_step:1',   lambda d: not (d/'round_1'/'adapter').exists()),
    ('adapter_save:1', lambda d: (d/'round_1'/'adapter.tmp'/'adapter_model.safetensors').exists() and not (d/'round_1'/'adapter').exists()),
    ('test:1',         lambda d: (d/'round_1'/'adapter').is_dir() and len(read_records(d/'round_1'/'test.jsonl')) == 4
                                 and not (d/'round_1'/'metrics.json').exists()),
]

def kill_then_resume(cfg_file, d, kills, reference):
    "Kill a run of `cfg_file` in `d` at each (point, state) of `kills` in turn, then finish it: the files of `reference`."
    for fault, state in kills:
        r = stl_run(cfg_file, d, fault)
        assert r.returncode == -signal.SIGKILL, f"STL_FAULT={fault}: exit {r.returncode}, the point was not reached\n{r.stderr[-2000:]}"
        assert state(d), f"after the kill at {fault}"
    r = stl_run(cfg_file, d)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(d, reference)
    assert untimed(read_json(d/'metrics.json')) == untimed(read_json(reference/'metrics.json'))

def test_killed_at_every_stage_then_resumed_equals_uninterrupted(runs):
    d = runs/'killed'
    kill_then_resume(runs/'config.json', d, KILLS, runs/'reference')
    from stl_nb.models import load_vlm
    vlm = load_vlm('embedded', adapter=d/'round_1'/'adapter')   # the adapter loads, with LoRA weights in it
    assert any('lora_' in n for n, _ in vlm.model.named_parameters())
