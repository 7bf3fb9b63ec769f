"Scoring, accounting, grounding, metrics rows, figures and tables of stl_nb.evaluate, on records built from the world."
import json, random, re
import pytest
from stl_nb.data import SampleError, letter
from stl_nb.world import make_world, SLOT_NAMES, WorldConfig
from stl_nb.templates import render_rationale, render_negative, parse_rationale
from stl_nb.evaluate import (STATUSES, read_record, score, score_row, Scores, round_row, load_run, method_colours, PALETTE,
                             plot_rounds, plot_domains, plot_data, rationale_card, card_lines, round_of, best_round,
                             markdown_table, RED, ORANGE, GREEN)

PNG = b'\x89PNG\r\n\x1a\n'

@pytest.fixture(scope='module')
def test():
    return make_world(24, seed=1, split='test')

def ref(s, answer=None, cap=None):
    "The world's reference rationale of `s`, optionally with another answer or caption."
    return render_rationale((cap or s.meta['caption'], s.meta['reasoning'], s.answer if answer is None else answer), s.choices)

def rec(s, raw, kind='positive'): return {'id': s.id, 'kind': kind, 'raw': raw}

def wrong(s): return (s.answer + 1) % len(s.choices)


# --- accounting -----------------------------------------------------------------------------------------------------

def test_missing_records_are_counted_wrong_and_listed(test):
    recs = [rec(s, ref(s)) for s in test[5:]]
    sc = score(recs, test)
    assert sc.n == len(test) == 24
    assert sc.missing == [s.id for s in test[:5]]
    assert (sc.correct, sc.unparsed, sc.accuracy) == (19, 5, 19 / 24)
    assert sc.accuracy_parsed == 1.0                       # the paper's denominator leaves them out
    assert [r['status'] for r in sc.rows[:5]] == ['missing'] * 5
    assert '5 missing' in repr(sc) and test[0].id in repr(sc)

@pytest.mark.parametrize('seed', range(5))
def test_statuses_add_up(test, seed):
    rng, recs, want = random.Random(seed), [], {k: 0 for k in STATUSES}
    for s in test:
        k = rng.choice(STATUSES); want[k] += 1
        raw = {'correct': ref(s), 'wrong': ref(s, wrong(s)), 'unparsed': ref(s).split('\n\nCONCLUSION')[0]}.get(k)
        if raw is not None: recs.append(rec(s, raw))
    rng.shuffle(recs)                                       # order of the records does not matter
    sc = score(recs, test)
    assert {k: sc.count(k) for k in STATUSES} == want
    assert sc.n == sum(want.values()) == len(test)
    assert sc.unparsed == want['unparsed'] + want['missing']
    assert sc.accuracy == want['correct'] / len(test)
    read = len(test) - sc.unparsed
    assert sc.accuracy_parsed == (want['correct'] / read if read else None)
    assert [r['id'] for r in sc.rows] == [s.id for s in test]

def test_per_domain_sums(test):
    recs = [rec(s, ref(s) if i % 3 else ref(s, wrong(s))) for i, s in enumerate(test) if i % 5]
    sc = score(recs, test)
    doms = sc.by_domain()
    assert list(doms) == ['attribute', 'spatial', 'counting', 'comparison']
    for attr in ('n', 'correct', 'unparsed', 'incomplete', 'n_captions'):
        assert sum(getattr(d, attr) for d in doms.values()) == getattr(sc, attr), attr
    assert sc.domain_accuracy == {k: d.correct / d.n for k, d in doms.items()}
    assert sum(d.n * a for d, a in zip(doms.values(), sc.domain_accuracy.values())) == pytest.approx(sc.correct)

def test_paper_denominators(test):
    s0, s1, s2, s3 = test[:4]
    recs = [rec(s0, ref(s0)), rec(s1, ref(s1).split('\n\nCONCLUSION')[0]),                  # correct; unparsed
            rec(s2, 'REASONING: x\n\nCONCLUSION: ' + f'({s2.answer_letter})'),              # right, but no caption
            rec(s3, ref(s3, wrong(s3)))]                                                   # wrong
    sc = score(recs, test[:4])
    assert (sc.correct, sc.unparsed, sc.incomplete) == (2, 1, 1)
    assert sc.accuracy == 2 / 4
    assert sc.accuracy_parsed == 2 / 3
    assert sc.accuracy_complete == 1 / 2                   # what the STL extractor kept: the complete replies only

def test_errors_name_the_record(test):
    recs = [rec(s, ref(s)) for s in test]
    with pytest.raises(SampleError, match="record 'nope-1', field 'id'"): score(recs + [rec(test[0], '') | {'id': 'nope-1'}], test)
    with pytest.raises(SampleError, match='two records'): score(recs + recs[:1], test)
    with pytest.raises(SampleError, match=f"record '{test[0].id}', field 'answer'"):
        score([{'id': test[0].id, 'kind': 'positive', 'answer': 99}], test)
    with pytest.raises(SampleError, match='field \'answer\''): score([{'id': test[0].id, 'answer': True}], test)
    with pytest.raises(ValueError, match='pass kind='): score(recs + [rec(s, 'A', 'direct') for s in test], test)
    with pytest.raises(ValueError, match='no samples'): score(recs, [])
    with pytest.raises(ValueError, match='ids repeat'): score(recs, list(test) + [test[0]])

def test_kinds_and_the_same_judge(test):
    recs = [rec(s, ref(s, wrong(s)) if i % 4 == 0 else ref(s)) for i, s in enumerate(test)]
    direct = [rec(s, f"({s.answer_letter}) {s.answer_text}", 'direct') for s in test[:10]]
    assert score(recs + direct, test, kind='positive').rows == score(recs, test).rows
    d = score(recs + direct, test, kind='direct')
    assert (d.kind, d.correct, d.unparsed, d.incomplete, d.n_captions) == ('direct', 10, 14, 0, 0)
    assert d.hallucination_rate is None and d.missing_needs_rate is None
    # the parsed fields, when a record carries them, give exactly what the raw text gives
    by = {s.id: s for s in test}
    pre = []
    for r in recs:
        p = parse_rationale(r['raw'], by[r['id']].choices)
        pre.append({**r, 'raw': '', 'answer': p.answer, 'caption': p.caption, 'reasoning': p.reasoning})
    assert score(pre, test).rows == score(recs, test).rows
    assert read_record({'id': 'x', 'kind': 'direct', 'raw': 'the answer is (B)'}, test[0]).answer == 1


# --- grounding ------------------------------------------------------------------------------------------------------

def extra_object(s):
    "The reference caption with a large red square in an empty slot the question does not need, or None."
    names, taken = SLOT_NAMES[s.meta['scene']['n_slots']], {o['slot'] for o in s.meta['scene']['objs']}
    free = [n for i, n in enumerate(names) if i not in taken and all(f[0] != n for f in s.meta['needs'])]
    return s.meta['caption'].replace(f'{free[0]}: nothing', f'{free[0]}: large red square') if free else None

def without_needed(s):
    slot = s.meta['needs'][0][0]
    return ' '.join(p for p in re.split(r'(?<=\.) ', s.meta['caption']) if not p.startswith(f'{slot}:'))

def test_grounding_rates_exactly_as_constructed(test):
    halluc = [s for s in test if extra_object(s)][:3]
    drop = [s for s in test if s not in halluc][:2]
    nocap = [s for s in test if s not in halluc + drop][:4]
    recs = ([rec(s, ref(s, cap=extra_object(s))) for s in halluc] + [rec(s, ref(s, cap=without_needed(s))) for s in drop]
            + [rec(s, render_rationale((None, s.meta['reasoning'], s.answer), s.choices, caption=False)) for s in nocap]
            + [rec(s, ref(s)) for s in test if s not in halluc + drop + nocap])
    sc = score(recs, test)
    assert sc.n_captions == len(test) - 4                  # the rates are over replies with a caption only
    assert sc.hallucination_rate == 3 / 20
    assert sc.missing_needs_rate == 2 / 20
    assert {r['id'] for r in sc.rows if r['hallucinated']} == {s.id for s in halluc}
    assert {r['id'] for r in sc.rows if r['missing_needs']} == {s.id for s in drop}
    assert all(len(r['hallucinated']) == 3 for r in sc.rows if r['hallucinated'])      # size, colour and shape invented
    assert sc.accuracy == 1.0 and sc.incomplete == 4
    row = round_row(sc, 2, 10, 20, 1.5)
    assert (row['hallucination_rate'], row['missing_needs_rate']) == (3 / 20, 2 / 20)

def test_grounding_is_none_off_the_world(test):
    s = test[0]
    plain = s.__class__(s.id, s.image, s.question, s.choices, s.answer, domain='science_natural')
    sc = score([rec(plain, ref(s))], [plain])
    assert (sc.n_captions, sc.hallucination_rate, sc.missing_needs_rate) == (0, None, None)
    assert sc.domain_accuracy == {'science_natural': 1.0}

def test_grounding_uses_the_world_config():
    cfg = WorldConfig(shapes=('circle', 'square', 'diamond'))
    s = next(s for s in make_world(12, seed=3, split='test', cfg=cfg) if ' circle' in s.meta['caption'])
    r = rec(s, ref(s, cap=s.meta['caption'].replace(' circle', ' diamond', 1)))
    assert any(f[1:] == ('shape', 'diamond') for f in score_row(s, r, cfg=cfg)['hallucinated'])
    assert not any('diamond' in f for f in score_row(s, r)['hallucinated'])     # the default world does not know the word
    assert score_row(s, rec(s, ref(s)), cfg=cfg)['hallucinated'] == []


# --- metrics rows ---------------------------------------------------------------------------------------------------

def test_round_row_is_json_and_has_the_contract_fields(test):
    sc = score([rec(s, ref(s)) for s in test[:20]], test)
    row = round_row(sc, 0, 0, 0, 12.5)
    assert {'round', 'accuracy', 'domain_accuracy', 'unparsed', 'n_positive', 'n_negative', 'seconds'} <= set(row)
    assert json.loads(json.dumps(row)) == row
    assert (row['round'], row['accuracy'], row['unparsed'], row['missing'], row['n']) == (0, 20 / 24, 4, 4, 24)
    assert round_row(sc, 0)['n_positive'] is None


# --- figures and tables ---------------------------------------------------------------------------------------------

def run(method, accs, domains=('a', 'b'), neg=True):
    rows = [dict(round=r, accuracy=a, domain_accuracy={d: a + .01 * k for k, d in enumerate(domains)}, unparsed=0,
                 n_positive=10 * r, n_negative=20 * r if neg else 0, seconds=1.0) for r, a in enumerate(accs)]
    return dict(method=method, config={}, rounds=rows)

@pytest.fixture
def runs():
    return [run('STL', [.3, .5, .6]), run('STaR', [.3, .45, .4], neg=False), run('direct', [.3, .35, .38], ('a', 'b', 'c'))]

def test_plots_write_png(tmp_path, runs):
    for f, name in ((plot_rounds, 'r.png'), (plot_data, 'd.png')):
        fig = f(runs, tmp_path / 'sub' / name)
        assert (tmp_path / 'sub' / name).read_bytes()[:8] == PNG
    fig = plot_domains(runs, rnd=1, path=tmp_path / 'dom.png')
    assert (tmp_path / 'dom.png').read_bytes()[:8] == PNG
    assert len(fig.axes[0].patches) == 3 * 4               # 3 methods x (3 domains + overall)
    assert plot_rounds(runs).axes[0].get_lines()[0].get_color() == method_colours(['STL'])['STL']

def test_plots_read_run_folders(tmp_path, runs):
    (tmp_path / 'stl').mkdir()
    (tmp_path / 'stl' / 'metrics.json').write_text(json.dumps(runs[0]))
    assert load_run(tmp_path / 'stl') == load_run(tmp_path / 'stl' / 'metrics.json') == runs[0]
    fig = plot_rounds([tmp_path / 'stl', runs[1]])
    assert [l.get_label() for l in fig.axes[0].get_lines()] == ['STL', 'STaR']
    with pytest.raises(ValueError, match='share a method'): plot_rounds([runs[0], runs[0]])
    with pytest.raises(ValueError, match="'round' and 'accuracy'"): plot_data([{'method': 'x', 'rounds': [{'round': 0}]}])
    with pytest.raises(ValueError, match='no runs'): plot_rounds([])

def test_rationale_card(tmp_path, test):
    s = next(t for t in test if 'left: nothing' in t.meta['caption'])
    neg = render_negative(s.meta['caption'], 'because it is not.')
    fig = rationale_card(s, ref(s), neg, tmp_path / 'card.png', wrong=wrong(s))
    assert (tmp_path / 'card.png').read_bytes()[:8] == PNG
    assert len(fig.axes) == 2
    lines = card_lines(s, ref(s, wrong(s), cap=s.meta['caption'] + ' left: large red square.'))
    assert [c for l, c, b in lines if 'wrong: the answer is' in l] == [RED]
    assert [c for l, c, b in lines if l.startswith('not in the image: left')] == [RED]
    lines = card_lines(s, ref(s).split('\n\nCONCLUSION')[0])
    assert [c for l, c, b in lines if l.startswith('no option could be read')] == [ORANGE]
    assert [l for l, c, b in card_lines(s, ref(s)) if c == GREEN][-1].endswith('✓ correct')
    assert not any(l.startswith('NEGATIVE') for l, c, b in card_lines(s, ref(s)))

def test_round_choice(runs):
    assert round_of(runs[1])['round'] == 2 and round_of(runs[1], -2)['round'] == 1
    assert best_round(runs[1])['round'] == 1
    assert best_round(run('x', [.5, .5, .4]))['round'] == 0          # the earliest on a tie
    with pytest.raises(ValueError, match='no round 7'): round_of(runs[0], 7)
    with pytest.raises(ValueError, match='3 rounds'): round_of(runs[0], -4)

def test_markdown_table():
    "Chapter 11's comparison table goes through `markdown_table`: index first, numbers right-aligned, a dash for a gap."
    import pandas as pd
    tab = pd.DataFrame({('STL', 'final'): [62.4, None, 2], ('STaR', 'best'): [46.0, 40.0, 1]},
                       index=pd.Index(['a', 'c', 'round'], name='domain'), dtype=object)
    md = markdown_table(tab).splitlines()
    assert md[0] == '| domain | STL final | STaR best |' and md[1] == '| --- |' + ' ---: |' * 2
    assert md[3] == '| c | – | 40.0 |' and md[-1] == '| round | 2 | 1 |'

def test_method_colours_are_stable():
    a = method_colours(['STL', 'STaR', 'direct', 'mine'])
    assert a['STL'] == method_colours(['STL'])['STL'] == method_colours(['other', 'STL'])['STL']
    assert len(set(a.values())) == 4 and set(a.values()) <= set(PALETTE)
    assert len(set(method_colours([f'run {i}' for i in range(10)]).values())) == 10
