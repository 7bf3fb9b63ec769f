"The loop (stl_nb.loop): metrics schema, round folders, resuming, refusals, the baselines, the comparison and the commands."
import json, os, shutil, subprocess, sys, time
from dataclasses import replace
from pathlib import Path
import pytest
from stl_nb.loop import (METHODS, PAPER_METHODS, Method, RunError, STLConfig, tiny_config, embedded_config, real_config, run_stl, run_compare,
                         load_data, prepare_out, paired_gain, mean_run, comparison_table, share_files)
from stl_nb.cli import cli_config, run_parser
from stl_nb.generate import GenConfig, read_records
from stl_nb.models import _embedded_dir

needs_model = pytest.mark.skipif(not (_embedded_dir()/'config.json').exists(),
                                 reason="the embedded model is not built (stl_nb/assets/embedded, chapter 04)")
ROW_KEYS = {'round': int, 'accuracy': float, 'domain_accuracy': dict, 'unparsed': int, 'n_positive': int, 'n_negative': int,
            'seconds': float}

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "One torch thread for this module's runs: on two shared cores, two threads wait on each other (generation 10x slower)."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny(tmp, method='stl', **kw): return tiny_config(method=method, out=str(Path(tmp)/method), **kw)

@pytest.fixture(scope='module')
def stl(tmp_path_factory):
    "A finished 2-round tiny STL run: (config, metrics)."
    cfg = tiny(tmp_path_factory.mktemp('loop'))
    return cfg, run_stl(cfg, progress=False)

def files(d): return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in Path(d).rglob('*') if p.is_file()}

# ---------------------------------------------------------------- config, methods, data (no model)

def test_config_round_trip():
    cfg = embedded_config(method='star', seed=5, domains=['counting'], gen=GenConfig(temperature=.5, n=2))
    back = STLConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.train.seed == back.gen.seed == back.eval_gen.seed == 5 and back.domains == ('counting',)
    assert real_config().train.lora_r == 128 and real_config().quant == '4bit'
    with pytest.raises(RunError, match='unknown config fields'): STLConfig.from_dict({**cfg.to_dict(), 'lr': 1})

def test_config_refusals():
    for kw, msg in [(dict(method='r4v'), 'unknown method'), (dict(quant='8bit'), "quant must be"), (dict(rounds=-1), 'rounds must be'),
                    (dict(limit=0), 'limit must be'), (dict(test_limit=0), 'test_limit must be')]:
        with pytest.raises(RunError, match=msg): STLConfig(**kw)

def test_methods():
    assert set(PAPER_METHODS) == {'stl', 'stl-no-caption', 'stl-no-negatives', 'stl-no-caption-no-negatives', 'zero-shot', 'direct', 'star', 'r3v'}
    assert set(METHODS) == set(PAPER_METHODS) | {'stl-strict', 'stl-pool', 'stl-consistent-negatives', 'stl-faithful-negatives', 'stl-star'} and METHODS['stl-strict'].strict and METHODS['stl-pool'].pool
    assert METHODS['r3v'].reflect and METHODS['r3v'].samples == 3 and not METHODS['r3v'].negatives
    assert not any(METHODS[m].strict for m in PAPER_METHODS)
    assert METHODS['star'].rationalize and not METHODS['star'].negatives and METHODS['stl'].negatives
    assert {n for n, m in METHODS.items() if not m.caption} == {'stl-no-caption', 'stl-no-caption-no-negatives', 'direct'}
    with pytest.raises(ValueError): Method(target='answers')

def test_prepare_out(tmp_path):
    cfg = tiny_config(out=str(tmp_path/'r'))
    prepare_out(cfg)
    with pytest.raises(RunError, match="another config"): prepare_out(replace(cfg, data_seed=3))
    assert json.loads((prepare_out(replace(cfg, data_seed=3), overwrite=True)/'config.json').read_text())['data_seed'] == 3
    (tmp_path/'mine').mkdir(); (tmp_path/'mine'/'x.txt').write_text('x')
    with pytest.raises(RunError, match='holds no run'): prepare_out(replace(cfg, out=str(tmp_path/'mine')), overwrite=True)
    assert (tmp_path/'mine'/'x.txt').exists()

def test_load_data(tmp_path):
    assert len(load_data('embedded', 'test', limit=5)) == 5
    assert load_data('embedded', 'train', limit=3, seed=1)[0].id == load_data('embedded', 'train', limit=4, seed=1)[0].id
    with pytest.raises(RunError, match='unknown data'): load_data('nowhere')
    with pytest.raises(RunError, match="split must be"): load_data('embedded', 'val')
    with pytest.raises(RunError, match="domains"): load_data('embedded', domains=('astrology',))
    (tmp_path/'train').mkdir()
    (tmp_path/'train'/'samples.jsonl').write_text(json.dumps(dict(id='a', question='q?', choices=['x', 'y'], answer=1)) + '\n')
    with pytest.raises(RunError, match='no usable question.*image'): load_data(str(tmp_path))

def test_paired_gain_and_means():
    import pandas as pd
    b = pd.DataFrame({'status': ['correct', 'wrong', 'wrong', 'wrong']}, index=list('abcd'))
    a = pd.DataFrame({'status': ['wrong', 'correct', 'correct', 'wrong']}, index=list('abcd'))
    g = paired_gain(b, a)
    assert (g['gain'], g['gained'], g['lost'], g['n']) == (0.25, 2, 1, 4) and g['lo'] < 0 < g['hi']
    row = lambda r, acc: dict(round=r, accuracy=acc, domain_accuracy={'x': acc}, n_positive=1, n_negative=0, seconds=1., unparsed=0, n=4)
    runs = [dict(method='m', config={'seed': s}, rounds=[row(0, .5), row(1, .5 + s/10)]) for s in (0, 2)]
    m = mean_run('m', runs)
    assert m['rounds'][1]['accuracy'] == pytest.approx(.6) and m['rounds'][1]['accuracy_sd'] == pytest.approx(.1414, abs=1e-3)
    t = comparison_table({'m': runs})
    assert t.loc['overall', 'm'] == '60.0 ± 14.1' and t.loc['gain over round 0', 'm'] == '+10.0 ± 14.1' and t.loc['seeds', 'm'] == '2'

def test_cli_config():
    assert cli_config().out == 'runs/stl' and cli_config(model='org/name').quant == '4bit'
    assert cli_config(quant=None, model='org/name').quant is None and cli_config(domains=('a', 'b')).domains == ('a', 'b')
    flags = vars(run_parser().parse_args(['--quant', 'none', '--domains', 'a, b', '--data_seed', '2', '--gen.temperature', '.5']))
    assert {k: flags[k] for k in ('quant', 'domains', 'data_seed', 'gen.temperature')} == dict(quant=None, domains=('a', 'b'),
                                                                                            data_seed=2, **{'gen.temperature': .5})
    with pytest.raises(RunError, match='unknown method'): cli_config(method='x')

# ---------------------------------------------------------------- a real tiny run

@needs_model
def test_metrics_schema(stl):
    cfg, m = stl
    assert set(m) == {'method', 'config', 'rounds'} and m['method'] == 'stl'
    assert STLConfig.from_dict(m['config']) == cfg
    assert [r['round'] for r in m['rounds']] == [0, 1, 2]
    for r in m['rounds']:
        for k, t in ROW_KEYS.items(): assert isinstance(r[k], t), (k, r[k])
        assert 0 <= r['accuracy'] <= 1 and set(r['domain_accuracy']) == {'attribute', 'spatial', 'counting', 'comparison'}
        assert all(0 <= a <= 1 for a in r['domain_accuracy'].values()) and r['n'] == 16
    assert (m['rounds'][0]['n_positive'], m['rounds'][0]['n_negative']) == (0, 0)
    assert json.loads((Path(cfg.out)/'metrics.json').read_text()) == m

@needs_model
def test_round_folders_complete(stl):
    cfg, m = stl
    out = Path(cfg.out)
    assert {'config.json', 'metrics.json', 'report.md', 'plots/accuracy.png', 'plots/domains.png'} <= set(files(out))
    assert {'test.jsonl', 'scores.csv', 'metrics.json'} <= set(files(out/'round_0'))
    for r in m['rounds'][1:]:
        d = out/f"round_{r['round']}"
        assert {'positives.jsonl', 'negatives.jsonl', 'round.json', 'test.jsonl', 'scores.csv', 'metrics.json'} <= set(files(d))
        trained = r['n_positive'] + r['n_negative'] > 0
        assert (d/'adapter'/'adapter_config.json').exists() == trained == (r['adapter'] == f"round_{r['round']}/adapter")
        assert len(read_records(d/'positives.jsonl')) == 24 and len(read_records(d/'test.jsonl')) == 16
        assert sum(x['kind'] == 'negative' for x in read_records(d/'negatives.jsonl')) >= r['n_negative']
    text = (out/'report.md').read_text()
    assert 'Accuracy per round' in text and 'Accuracy per domain' in text and ('95% interval' in text)
    assert not list(out.rglob('*.tmp'))

@needs_model
def test_generation_provenance(stl):
    cfg, m = stl
    out = Path(cfg.out)
    assert {(r['round'], r['adapter']) for r in read_records(out/'round_1'/'positives.jsonl')} == {(1, None)}
    assert {(r['round'], r['adapter']) for r in read_records(out/'round_2'/'positives.jsonl')} == {(2, m['rounds'][1]['adapter'])}
    assert {(r['round'], r['adapter'], r['kind']) for r in read_records(out/'round_2'/'test.jsonl')} == {(2, m['rounds'][2]['adapter'], 'positive')}

@needs_model
def test_finished_run_not_redone(stl, monkeypatch):
    cfg, m = stl
    import stl_nb.loop as loop
    def boom(*a, **k): raise AssertionError("a finished run loaded a model or data")
    monkeypatch.setattr(loop, 'load_vlm', boom); monkeypatch.setattr(loop, 'load_data', boom)
    rounds = {k: v for k, v in files(cfg.out).items() if k.startswith('round_')}
    assert run_stl(cfg, progress=False) == m
    assert {k: v for k, v in files(cfg.out).items() if k.startswith('round_')} == rounds

@needs_model
def test_resume_after_interruption_gives_the_same_files(stl, tmp_path):
    "Round 2 cut short after its generation (half its negatives, no adapter, half its test answers): the rerun ends with the same files."
    cfg, m = stl
    cut = replace(cfg, out=str(tmp_path/'cut'))
    shutil.copytree(cfg.out, cut.out)
    d = Path(cut.out)/'round_2'
    for f in ('metrics.json', 'scores.csv', 'train.json'): (d/f).unlink(missing_ok=True)
    shutil.rmtree(d/'adapter', ignore_errors=True)
    for f in ('negatives.jsonl', 'test.jsonl'): (d/f).write_bytes((d/f).read_bytes()[:len((d/f).read_bytes())//2])
    again = run_stl(cut, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]
    assert strip(again['rounds']) == strip(m['rounds'])
    orig = Path(cfg.out)/'round_2'
    for f in ('negatives.jsonl', 'test.jsonl', 'scores.csv'): assert (d/f).read_bytes() == (orig/f).read_bytes(), f
    if (orig/'adapter').exists():
        assert (d/'adapter'/'adapter_model.safetensors').read_bytes() == (orig/'adapter'/'adapter_model.safetensors').read_bytes()

@needs_model
@pytest.mark.parametrize('method', ['direct', 'zero-shot', 'star', 'stl-no-caption'])
def test_baselines(method, tmp_path):
    cfg = tiny(tmp_path, method, rounds=1, limit=16, test_limit=8)
    m = run_stl(cfg, progress=False)
    out, me = Path(cfg.out), METHODS[method]
    assert set(m) == {'method', 'config', 'rounds'} and m['method'] == method
    assert [r['round'] for r in m['rounds']] == ([0] if method == 'zero-shot' else [0, 1])
    assert {r['kind'] for r in read_records(out/'round_0'/'test.jsonl')} == {me.kind}
    if method == 'direct':
        assert not (out/'round_1'/'positives.jsonl').exists() and m['rounds'][1]['n_positive'] == 16
        assert (out/'round_1'/'adapter').is_dir()
    if method == 'star':
        rat = read_records(out/'round_1'/'rationalized.jsonl')
        right = {r['id'] for r in read_records(out/'round_1'/'positives.jsonl') if r['answer'] is not None and r['letter'] and r['finished']}
        assert {r['kind'] for r in rat} <= {'star'} and m['rounds'][1]['n_negative'] == 0
        assert m['rounds'][1]['n_rationalized'] <= len(rat) and len(rat) + len(right) >= 16
    if method == 'stl-no-caption':
        assert {r['kind'] for r in read_records(out/'round_1'/'negatives.jsonl')} <= {'negative-nocap'}

@needs_model
def test_compare(stl, tmp_path):
    cfg, m = stl
    shutil.copytree(cfg.out, tmp_path/'cmp'/'stl'/'seed_0')
    table = run_compare(replace(cfg, out='x'), ['stl', 'zero-shot'], [0], tmp_path/'cmp', progress=False)
    out = tmp_path/'cmp'
    assert list(table.columns) == ['stl', 'zero-shot'] and 'overall' in table.index
    assert {'compare.md', 'compare.csv', 'plots/rounds.png', 'plots/domains.png'} <= set(files(out))
    z = out/'zero-shot'/'seed_0'/'round_0'/'test.jsonl'     # round 0 shared: the same records as STL's
    assert z.read_bytes() == (out/'stl'/'seed_0'/'round_0'/'test.jsonl').read_bytes()
    import pandas as pd
    csv = pd.read_csv(out/'compare.csv')
    assert set(csv.columns) == {'method', 'seed', 'round', 'domain', 'accuracy', 'n_positive', 'n_negative', 'seconds'}
    assert set(csv['method']) == {'stl', 'zero-shot'} and 'overall' in set(csv['domain'])

# ---------------------------------------------------------------- the commands

CLI = shutil.which('stl_run')
needs_cli = pytest.mark.skipif(CLI is None, reason="the stl_run command is not installed (pip install -e .)")

def sh(*args, env=None, cwd=None):
    return subprocess.run(list(args), capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)

@needs_cli
def test_cli_help():
    r = sh('stl_run', '--help')
    assert r.returncode == 0
    for flag in ('--model', '--data', '--method', '--rounds', '--out', '--seed', '--quant', '--limit', '--test_limit', '--overwrite'):
        assert flag in r.stdout, flag
    assert sh('stl_compare', '--help').returncode == 0

@needs_cli
@pytest.mark.parametrize('args,msg', [(['--bogus', '1'], 'unrecognized arguments'), (['--rounds', 'x'], 'invalid'),
                                      (['--method', 'stl-plus'], "unknown method 'stl-plus'"), (['--data', 'nowhere'], "unknown data 'nowhere'"),
                                      (['--model', 'not a model'], 'not \'embedded\''), (['--limit', '0'], 'limit must be')])
def test_cli_bad_input_exits_2(args, msg, tmp_path):
    r = sh('stl_run', '--out', str(tmp_path/'o'), *args)
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path/'o').exists()

@needs_cli
def test_cli_impossible_combinations_exit_2(tmp_path):
    (tmp_path/'data'/'train').mkdir(parents=True); (tmp_path/'data'/'test').mkdir()
    for s in ('train', 'test'):
        (tmp_path/'data'/s/'samples.jsonl').write_text(json.dumps(dict(id='a', question='q?', choices=['x', 'y'], answer=1)) + '\n')
    r = sh('stl_run', '--data', str(tmp_path/'data'), '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and 'no usable question' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    fake = tmp_path/'nobnb'/'bitsandbytes'; fake.mkdir(parents=True)
    (fake/'__init__.py').write_text("raise ImportError('no bitsandbytes backend here (simulated)')\n")
    r = sh('stl_run', '--quant', '4bit', '--out', str(tmp_path/'o'), env={'PYTHONPATH': str(tmp_path/'nobnb')})
    assert r.returncode == 2 and "quant='4bit' needs bitsandbytes" in r.stderr, r.stderr
    assert not (tmp_path/'o').exists()


def test_fit_context_counts_images_as_the_run_loads_them(qwen_dir, tmp_path):
    "Qwen2.5-VL's images are counted at the pixel cap `load_vlm` applies (256 tokens at most), not at the processor's own budget."
    from PIL import Image
    from stl_nb.data import samples_from_records
    from stl_nb.loop import fit_context
    from stl_nb.models import tiny_model
    d = tiny_model(qwen_dir, tmp_path/'qwen', max_position_embeddings=640)   # room for 256 image tokens, the prompt and 192 new
    recs = [dict(id=f'q{i}', image=Image.new('RGB', (s, s)), question='Which colour?', choices=['red', 'blue'], answer=0)
            for i, s in enumerate((448, 1400))]                                  # 1400² uncapped: ~2,500 image tokens
    s = fit_context(samples_from_records(recs), tiny_config(model=str(d)), 'test')
    assert [x.id for x in s] == ['q0', 'q1'] and not s.rejected


# ---------------------------------------------------------------- what a run tells its user (issue 14, item 8)

def test_log_round_says_when_nothing_was_kept(capsys):
    from stl_nb.loop import log_round
    class FakeRun:
        progress, cfg = True, tiny_config()
        def row(self, rnd): return dict(accuracy=.5)
    log_round(FakeRun(), dict(round=1, accuracy=.5, n_positive=0, n_negative=0, seconds=6.))
    log_round(FakeRun(), dict(round=2, accuracy=.5, n_positive=3, n_negative=4, seconds=6.))
    first, second = capsys.readouterr().out.splitlines()
    assert 'kept no positives' in first and 'trained on' not in first
    assert 'trained on 3 positives + 4 negatives' in second

def test_data_md_lists_every_rejected_record(tmp_path):
    "Five bad records among good ones: data.md names each, with its field and reason, and no '... and N more'."
    from PIL import Image
    from stl_nb.data import samples_from_records
    from stl_nb.loop import Run, write_data_report
    good = [dict(id=f'g{i}', image=Image.new('RGB', (8, 8)), question='q?', choices=['a', 'b'], answer=0) for i in range(2)]
    bad = [dict(id=f'b{i}', image=Image.new('RGB', (8, 8)), question='q?', choices=['a'], answer=0) for i in range(5)]
    run = Run(tiny_config(out=str(tmp_path)), tmp_path, data={'train': samples_from_records(good + bad)})
    write_data_report(run)
    text = (tmp_path/'data.md').read_text()
    assert 'more' not in text and all(f"record 'b{i}', field 'choices'" in text for i in range(5)), text

def test_several_replies_per_question_keep_the_first_right_one(tmp_path):
    "gen.n=3 sampled replies per question, per_question=1, greedy negatives: one kept rationale per solved question, one negative per wrong option."
    from stl_nb.keep import keep_correct
    from stl_nb.loop import load_data
    gen = GenConfig(max_new_tokens=192, batch_size=64, temperature=1.0, n=3)
    cfg = tiny(tmp_path, gen=gen, per_question=1, neg_temperature=0.0, rounds=1)
    m = run_stl(cfg, progress=False)
    d = Path(cfg.out)/'round_1'
    train = load_data('embedded', 'train', cfg.limit, seed=cfg.data_seed)
    pos, neg = read_records(d/'positives.jsonl'), read_records(d/'negatives.jsonl')
    assert len(pos) == 3*len(train) and {r['k'] for r in pos} == {0, 1, 2}
    kept, report = keep_correct(pos, train, per_question=1)
    assert kept, "the tiny run should solve some question"
    assert len({r['id'] for r in kept}) == len(kept) == m['rounds'][1]['n_positive']
    assert report.by_reason['extra_reply'] == len(keep_correct(pos, train)[0]) - len(kept)
    choices = {s.id: len(s.choices) for s in train}
    assert len(neg) == sum(choices[r['id']] - 1 for r in kept)
    assert all(r['k'] == 0 and r['gen']['temperature'] == 0.0 and r['gen']['n'] == 1 for r in neg)
    assert json.loads((Path(cfg.out)/'config.json').read_text())['per_question'] == 1

def test_test_domains_set_the_test_split_apart(tmp_path):
    "Cross-domain transfer (issue 16): train on one domain, test on others; () tests on the training domains."
    from stl_nb.loop import Run
    cfg = tiny_config(domains=('counting',), test_domains=('attribute', 'counting'), out=str(tmp_path/'t'))
    run = Run(cfg, Path(cfg.out), progress=False)
    assert {s.domain for s in run.samples('train')} == {'counting'}
    assert {s.domain for s in run.samples('test')} == {'attribute', 'counting'}
    same = Run(tiny_config(domains=('counting',), out=str(tmp_path/'u')), tmp_path/'u', progress=False)
    assert {s.domain for s in same.samples('test')} == {'counting'}
    assert STLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).test_domains == ('attribute', 'counting')
    flags = vars(run_parser().parse_args(['--test_domains', 'spatial,comparison']))
    assert flags['test_domains'] == ('spatial', 'comparison')
    assert cli_config(test_domains=flags['test_domains']).test_domains == ('spatial', 'comparison')
