"R3V (issue 15): its examples, its round (sampled, pooled) and test-time selection, resumed after a kill at each of its stages."
from pathlib import Path
import pytest
from stl_nb.loop import METHODS, tiny_config, run_stl, write_json, read_json
from stl_nb.generate import GenConfig, read_records
from stl_nb.train import embedded_train_config
from stl_nb.models import _embedded_dir
from conftest import STL_RUN
from test_crash import stl_run, kill_then_resume

pytestmark = pytest.mark.skipif(not (_embedded_dir()/'config.json').exists(), reason="the embedded model is not built (chapter 04)")

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope='module')
def r3v(tmp_path_factory):
    "A finished 2-round tiny R3V run: (config, metrics)."
    cfg = tiny_config(method='r3v', out=str(tmp_path_factory.mktemp('r3v')/'r3v'))
    return cfg, run_stl(cfg, progress=False)

def test_r3v_samples_pools_and_selects(r3v):
    cfg, m = r3v
    out, rows = Path(cfg.out), m['rounds']
    for rnd in (1, 2):
        recs = read_records(out/f'round_{rnd}'/'positives.jsonl')
        assert len(recs) == 3 * cfg.limit and {r['k'] for r in recs} == {0, 1, 2}           # 3 samples a question
        assert {r['gen']['temperature'] for r in recs} == {0.9} and {r['round'] for r in recs} == {rnd}
        pool = read_json(out/f'round_{rnd}'/'pool.json')
        assert pool['records'] == 3 * cfg.limit * rnd and pool['rounds'] == list(range(rnd, 0, -1))   # the pool grows
        ex = pool['examples']
        assert rows[rnd]['n_positive'] == ex['positive'] <= cfg.limit and rows[rnd]['n_negative'] == 0
        assert rows[rnd]['n_refine'] == ex.get('refine', 0) and rows[rnd]['n_select'] == ex.get('select', 0)
        assert not (out/f'round_{rnd}'/'negatives.jsonl').exists()
        samples = read_records(out/f'round_{rnd}'/'test_samples.jsonl')
        picked = read_records(out/f'round_{rnd}'/'test_select.jsonl')
        assert len(samples) == 3 * cfg.test_limit and len(picked) == cfg.test_limit and {r['kind'] for r in picked} == {'select'}
        assert 0 <= rows[rnd]['majority_accuracy'] <= rows[rnd]['oracle_accuracy'] <= 1
    assert 'select_accuracy' not in rows[0] and rows[1]['samples'] == 3
    report = (out/'report.md').read_text()
    section = report.split('## R3V at test time (%)')[1].split('## Figures')[0]   # the section exists, with its four lines
    assert all(line in section for line in ('Test@1 (greedy)', 'select@3', 'majority@3 (reference)', 'oracle@3 (reference)'))

def test_r3v_select_accuracy_is_what_the_select_replies_chose(r3v):
    "select@3 recomputed from the files: the select reply's option against the gold answer."
    cfg, m = r3v
    from stl_nb.loop import load_data
    gold = {s.id: s.answer for s in load_data(cfg.data, 'test', cfg.test_limit, cfg.data_seed)}
    for rnd in (1, 2):
        picked = read_records(Path(cfg.out)/f'round_{rnd}'/'test_select.jsonl')
        assert m['rounds'][rnd]['select_accuracy'] == pytest.approx(sum(r['answer'] == gold[r['id']] for r in picked) / len(gold))
        sampled = read_records(Path(cfg.out)/f'round_{rnd}'/'test_samples.jsonl')
        oracle = len({r['id'] for r in sampled if r['answer'] == gold[r['id']]}) / len(gold)
        assert m['rounds'][rnd]['oracle_accuracy'] == pytest.approx(oracle)

R3V_KILLS = [   # (crash point, what the folder shows right after the kill); a question's 3 samples share a batch of at most 4
    ('positives:2',    lambda d: len(read_records(d/'round_1'/'positives.jsonl')) == 6),
    ('train_step:1',   lambda d: not (d/'round_1'/'adapter').exists()),
    ('test_samples:1', lambda d: (d/'round_1'/'test.jsonl').exists() and 0 < len(read_records(d/'round_1'/'test_samples.jsonl')) < 24),
    ('test_select:1',  lambda d: 0 < len(read_records(d/'round_1'/'test_select.jsonl')) < 8 and not (d/'round_1'/'metrics.json').exists()),
]

@pytest.mark.skipif(STL_RUN is None, reason="the stl_run command is not installed (pip install -e .)")
def test_r3v_killed_at_each_stage_then_resumed_equals_uninterrupted(tmp_path):
    cfg = tiny_config(method='r3v', limit=16, test_limit=8, rounds=1, gen=GenConfig(max_new_tokens=96, batch_size=4),
                      eval_gen=GenConfig(max_new_tokens=96, batch_size=4), train=embedded_train_config(batch_size=8, logging_steps=1))
    write_json(tmp_path/'config.json', cfg.to_dict())
    assert stl_run(tmp_path/'config.json', tmp_path/'reference').returncode == 0
    kill_then_resume(tmp_path/'config.json', tmp_path/'killed', R3V_KILLS, tmp_path/'reference')
