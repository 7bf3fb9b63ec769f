"Two CPU processes under `accelerate launch --multi_gpu` (torchrun underneath; gloo on a machine without GPUs): sharded generation merges into the file one process writes; DDP training."
import json, os, socket, subprocess, sys
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
N = 8   # questions

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def test_two_processes(tmp_path):
    pytest.importorskip('accelerate')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'TQDM_DISABLE': '1',
           'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(free_port()),
           str(REPO/'tests'/'scale_script.py'), str(tmp_path), str(N)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [json.loads((tmp_path/f'rank{r}.json').read_text()) for r in range(2)]
    assert [(r['rank'], r['world'], r['records']) for r in ranks] == [(0, 2, N), (1, 2, N)]
    assert not list(tmp_path.glob('sharded.rank*.jsonl'))                 # the rank files are merged away

    # the one-process run of the same questions writes the same bytes
    from stl_nb.generate import GenConfig, generate, read_records
    from stl_nb.models import load_vlm
    from stl_nb.world import make_world
    import torch; torch.set_num_threads(1)
    qs = make_world(N, seed=0)
    generate(load_vlm('embedded'), qs, tmp_path/'one.jsonl', GenConfig(max_new_tokens=24, batch_size=1), progress=False)
    assert (tmp_path/'sharded.jsonl').read_bytes() == (tmp_path/'one.jsonl').read_bytes()
    keys = [(r['id'], r['kind'], r['wrong'], r['k']) for r in read_records(tmp_path/'sharded.jsonl')]
    assert len(set(keys)) == len(keys) == N

    # DDP: 8 examples, batch 2 per process -> 2 updates (not 4), and both ranks end with the same LoRA weights
    assert ranks[0]['updates'] == ranks[1]['updates'] == [1, 2]
    assert ranks[0]['lora'].keys() == ranks[1]['lora'].keys() and len(ranks[0]['lora']) > 0
    assert all(abs(ranks[0]['lora'][k] - ranks[1]['lora'][k]) < 1e-9 for k in ranks[0]['lora'])
    assert (tmp_path/'train'/'adapter'/'adapter_config.json').exists() and (tmp_path/'train'/'train.json').exists()
