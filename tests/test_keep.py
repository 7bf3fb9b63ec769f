"""stl_nb.keep: every generated record accounted for, one reason per drop, the same reading of a reply as evaluation."""
import random
from collections import Counter
from dataclasses import asdict
import pytest
from stl_nb.data import SampleError
from stl_nb.world import make_world
from stl_nb.templates import PromptStyle, chat, positive_prompt, render_rationale, render_negative
from stl_nb.generate import GenConfig, Job, Reply, make_record
from stl_nb.keep import DROP_REASONS, FilterReport, degenerate, judge, keep_correct, positive_examples

PROV = dict(round=0, model='reference', adapter=None, gen=asdict(GenConfig()))
WORLD = make_world(200, seed=3)

def ref(s, ans=None, caption=True):
    return render_rationale((s.meta['caption'], s.meta['reasoning'], s.answer if ans is None else ans), s.choices, caption=caption)

BREAK = {   # one way to break a reply per reason, and the reply kept
    None: lambda s: (ref(s), True),
    'wrong_answer': lambda s: (ref(s, (s.answer + 1) % len(s.choices)), True),
    'no_answer': lambda s: (ref(s).rsplit('CONCLUSION:', 1)[0] + 'CONCLUSION: not sure', True),
    'missing_reasoning': lambda s: (f"CAPTION: {s.meta['caption']}\n\nCONCLUSION: ({s.answer_letter}) {s.answer_text}", True),
    'missing_caption': lambda s: (ref(s).split('\n\n', 1)[1], True),
    'empty_caption': lambda s: (ref(s).replace(s.meta['caption'], '- -'), True),
    'truncated': lambda s: (ref(s).split('\n\nCONCLUSION')[0], False),
    'degenerate_repetition': lambda s: (ref(s).replace('REASONING:', 'REASONING: ' + 'so so so so so so so so so '), True),
}

def record(s, reason, kind='positive'):
    text, finished = BREAK[reason](s)
    return make_record(Job(s, kind), Reply(text, 50, finished), PROV)

def test_the_vocabulary_is_fixed_and_every_reason_reachable():
    "judge reaches each reason of BREAK; extra_reply comes from keep_correct(per_question=...), never from judge."
    assert set(BREAK) - {None} <= set(DROP_REASONS) and len(DROP_REASONS) == 10
    for i, (reason, _) in enumerate(BREAK.items()):
        s = WORLD[i]
        assert judge(record(s, reason), s) == reason, reason
    s = WORLD[0]
    twice = [record(s, None), dict(record(s, None), k=1), dict(record(s, 'wrong_answer'), k=2)]
    kept, rep = keep_correct(twice, WORLD, per_question=1)
    assert [r['k'] for r in kept] == [0] and rep.by_reason == Counter(extra_reply=1, wrong_answer=1)

@pytest.mark.parametrize('seed', range(5))
def test_everything_generated_is_accounted_for(seed):
    "Named invariant: kept + dropped per reason = generated, overall and in every domain, and each record counted once."
    rng = random.Random(seed)
    recs = [record(s, rng.choice(list(BREAK))) for s in WORLD]
    recs += [make_record(Job(s, 'negative', (s.answer + 1) % len(s.choices)),
                         Reply(render_negative(s.meta['caption'], 'because'), 30, rng.random() < .8), PROV) for s in WORLD[:50]]
    kept, rep = keep_correct(recs, WORLD)
    assert rep.kept + sum(rep.by_reason.values()) == rep.generated == len(recs)
    assert len(kept) == rep.kept
    for d, c in rep.counts.items():
        assert sum(c.values()) == sum(1 for r in recs if next(s for s in WORLD if s.id == r['id']).domain == d)
    dropped = [k for ks in rep.dropped.values() for k in ks]
    assert len(dropped) == len(set(dropped)) == len(recs) - len(kept)
    assert all(judge(r, next(s for s in WORLD if s.id == r['id'])) is None for r in kept)

def test_report_table_and_counts():
    recs = [record(s, r) for s, r in zip(WORLD, [None, None, 'wrong_answer', 'truncated'] * 10)]
    kept, rep = keep_correct(recs, WORLD)
    assert (rep.generated, rep.kept, rep.by_reason) == (40, 20, Counter(wrong_answer=10, truncated=10))
    t = rep.table()
    assert t.splitlines()[0].split()[:4] == ['domain', 'generated', 'kept', 'kept%']
    assert 'wrong_answer' in t and 'no_answer' not in t and t.splitlines()[-1].split()[:3] == ['all', '40', '20']
    assert repr(rep) == t and FilterReport().table().splitlines()[-1].split() == ['all', '0', '0', '0.0%']

def test_references_are_kept_in_every_layout():
    for s in WORLD:
        assert judge(record(s, None), s) is None
        assert judge(make_record(Job(s, 'positive-nocap'), Reply(ref(s, caption=False), 40, True), PROV), s) is None
        assert judge(make_record(Job(s, 'direct'), Reply(f"({s.answer_letter}) {s.answer_text}", 4, True), PROV), s) is None
        assert not degenerate(ref(s))

def test_degenerate():
    for t in ['0' * 51, 'ab' * 20, 'the circle is red. ' * 4, 'CAPTION: x\n' + '::::' * 10]: assert degenerate(t), t
    for t in ['', 'left: nothing. middle: nothing. right: nothing.', '1000000', 'wait... what?!', 'a b a b a b']: assert not degenerate(t), t

def test_the_filter_reads_replies_as_the_evaluation_does():
    "Same judge: a kept reply is scored correct and complete; a wrong one wrong; one with no answer unparsed."
    from stl_nb.evaluate import score_row
    rng = random.Random(0)
    for s in WORLD[:120]:
        reason = rng.choice([None, 'wrong_answer', 'no_answer', 'missing_caption', 'missing_reasoning'])
        r = record(s, reason)
        row = score_row(s, r)
        if reason is None: assert row['status'] == 'correct' and row['complete']
        if reason == 'wrong_answer': assert row['status'] == 'wrong'
        if reason == 'no_answer': assert row['status'] == 'unparsed'
        if reason in ('missing_caption', 'missing_reasoning'): assert not row['complete']
        assert score_row(s, {k: v for k, v in r.items() if k not in ('answer', 'caption', 'reasoning')})['status'] == row['status']

def test_examples_are_hint_free_and_re_rendered():
    s = WORLD[0]
    star = make_record(Job(s, 'star'), Reply('Sure!\n' + ref(s) + '\nDone.', 60, True), PROV)
    nocap = make_record(Job(s, 'positive-nocap'), Reply(ref(s, caption=False), 60, True), PROV)
    direct = make_record(Job(s, 'direct'), Reply(s.answer_text, 3, True), PROV)
    style = PromptStyle(hint='PSST the answer is {option}')
    (_, m1, t1), (_, m2, t2), (_, m3, t3) = positive_examples([star, nocap, direct], WORLD, style)
    assert m1 == chat(positive_prompt(s, style=style)) and 'PSST' not in m1[0]['content'][1]['text'] and t1 == ref(s)
    assert m2 == chat(positive_prompt(s, caption=False, style=style)) and t2 == ref(s, caption=False)
    assert t3 == f"({s.answer_letter}) {s.answer_text}"
    with pytest.raises(ValueError, match='negative_examples'): positive_examples([dict(star, kind='negative')], WORLD)

def test_strict_drops_right_letters_with_another_options_words():
    "The strict filter (not in the paper): a right letter whose words are another option's is dropped; nothing else changes."
    for s in WORLD[:40]:
        good = record(s, None)
        other = s.choices[(s.answer + 1) % len(s.choices)]
        lucky = dict(good, raw=good['raw'].rsplit('CONCLUSION:', 1)[0] + f"CONCLUSION: ({'ABCDEFGH'[s.answer]}) {other}")
        assert judge(lucky, s) is None and judge(lucky, s, strict=True) == 'inconsistent_conclusion'
        assert judge(good, s, strict=True) is None
    recs = [record(s, r) for s, r in zip(WORLD, [None, 'wrong_answer'] * 20)]
    assert keep_correct(recs, WORLD, strict=True)[1].by_reason == keep_correct(recs, WORLD)[1].by_reason
