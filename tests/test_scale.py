"""Two CPU processes under `accelerate launch --multi_gpu` (torchrun underneath; gloo on a machine without GPUs): generation shared
out by question merges into the file one process writes; DDP training; and `stl_run` itself launched, killed and resumed."""
import json, os, socket, subprocess, sys
from pathlib import Path
import pytest
from conftest import STL_RUN

REPO = Path(__file__).resolve().parents[1]
N = 8   # questions

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def launch(script, *args, cwd, fault=None, timeout=300):
    "`script` as two CPU processes under `accelerate launch`; `fault` sets STL_FAULT (chapter 04a) in both."
    pytest.importorskip('accelerate')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'TQDM_DISABLE': '1', 'STL_FAULT': fault or '',
           'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(free_port()), str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)

def test_two_processes(tmp_path):
    p = launch(REPO/'tests'/'scale_script.py', tmp_path, N, cwd=tmp_path)
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



def test_stl_run_launched(tmp_path):
    "`stl_run` as two processes: killed while making negatives, resumed by the same command; its generated files are the bytes of a one-process run."
    if STL_RUN is None: pytest.skip("the stl_run command is not installed (pip install -e .)")
    from stl_nb.generate import GenConfig, read_records, record_key
    from stl_nb.loop import read_json, run_stl, tiny_config, write_json
    from stl_nb.train import embedded_train_config
    import torch; torch.set_num_threads(1)
    one1 = GenConfig(max_new_tokens=96, batch_size=1)       # a reply does not depend on its batch-mates: comparable bytes
    cfg = tiny_config(limit=16, test_limit=8, rounds=1, gen=one1, eval_gen=one1,
                      train=embedded_train_config(epochs=1, batch_size=4, logging_steps=1))
    write_json(tmp_path/'config.json', cfg.to_dict())
    run_stl(cfg.__class__.from_dict({**cfg.to_dict(), 'out': str(tmp_path/'one')}), progress=False)

    args = ['--config', tmp_path/'config.json', '--out', tmp_path/'two', '--quiet']
    p = launch(STL_RUN, *args, cwd=tmp_path, fault='negatives:1')    # each process dies after its first batch of negatives
    assert p.returncode != 0
    d = tmp_path/'two'/'round_1'
    assert list(d.glob('negatives.rank*.jsonl')) and not (d/'adapter').exists()
    p = launch(STL_RUN, *args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count('report:') == 1                         # the main process alone prints the summary

    one, two = tmp_path/'one', tmp_path/'two'
    assert not list(two.rglob('*.rank*')) and not list(two.rglob('*.tmp'))
    for f in ('round_0/test.jsonl', 'round_1/positives.jsonl', 'round_1/negatives.jsonl'):
        keys = [record_key(r) for r in read_records(two/f)]
        assert len(set(keys)) == len(keys) > 0, f"{f}: a record twice"
        assert (two/f).read_bytes() == (one/f).read_bytes(), f"{f} differs from the one-process run"
    m1, m2 = read_json(one/'metrics.json'), read_json(two/'metrics.json')
    assert [r['round'] for r in m2['rounds']] == [0, 1] and m2['rounds'][0]['accuracy'] == m1['rounds'][0]['accuracy']
    assert len(read_records(two/'round_1'/'test.jsonl')) == 8 and (two/'report.md').exists()
    t1, t2 = read_json(one/'round_1'/'train.json'), read_json(two/'round_1'/'train.json')
    assert t2['n_examples'] == t1['n_examples'] > 0 and (two/'round_1'/'adapter'/'adapter_config.json').exists()
    # data-parallel: each optimizer step takes a batch in each process, so half the steps (rounded up)
    assert len(t1['losses']) == -(-t1['n_examples'] // 4) > len(t2['losses']) == -(-len(t1['losses']) // 2)
