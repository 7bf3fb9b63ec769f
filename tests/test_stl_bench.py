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
