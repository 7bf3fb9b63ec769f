"`bench/stl_bench.py` runs (tiny sizes): it imports bench_generate and the library, so it breaks when either changes shape."
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_stl_bench_gen_part_runs(tmp_path):
    out = tmp_path/'b.json'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(ROOT/'bench'/'stl_bench.py'), '--part', 'gen', '--n', '8', '--batch-size', '8',
                        '--max-new-tokens', '8', '--repeats', '1', '--out', str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'batched (8 per call)' in r.stdout and 'shared prefix (3 distr.)' in r.stdout
    rows = json.loads(out.read_text())['rows']
    shared = [x for x in rows if x['what'].startswith('shared prefix')][0]
    assert shared['ratio'] > 0 and shared['identical'] == shared['replies']

def run_bench(*args, timeout=600):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, str(ROOT/'bench'/'stl_bench.py'), *args], capture_output=True, text=True, env=env, timeout=timeout)

def test_stl_bench_spread_part_runs(tmp_path, qwen_dir, m3cot_dir):
    "The spread part at a tiny size (8 questions, a fraction of an epoch): its rows are there, and grouping pads less than random batches."
    out = tmp_path/'b.json'
    r = run_bench('--part', 'spread', '--spread-questions', '8', '--spread-epochs', '0.15', '--repeats', '1',
                  '--fixtures', str(qwen_dir.parent), '--out', str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x['what']: x for x in json.loads(out.read_text())['rows'] if x['part'] == 'spread'}
    assert rows["examples: 8 M3CoT questions' positives + negatives"]['value'] > 8   # a positive and 1 to 3 negatives each
    tokens = [x for w, x in rows.items() if w.startswith('image tokens')][0]['image_tokens']
    assert all(64 <= n <= 256 for n in tokens)
    for what in ('random batches', 'length-grouped batches'): assert rows[f'{what}: tokens/s']['value'] > 0
    assert rows['length-grouped batches: padding fraction']['value'] < rows['random batches: padding fraction']['value']
    assert rows['fully sorted batches: padding fraction']['value'] <= rows['length-grouped batches: padding fraction']['value']

def test_stl_bench_spread_part_skips_without_fixtures(tmp_path):
    out = tmp_path/'b.json'
    r = run_bench('--part', 'spread', '--fixtures', str(tmp_path/'none'), '--out', str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'spread: skipped, no fixture folder' in r.stdout and json.loads(out.read_text())['rows'] == []
