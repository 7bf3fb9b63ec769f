"Properties of the embedded world (stl_nb.world) over random seeds and configurations, checked with hypothesis."
import random, re
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from stl_nb.world import (WorldConfig, Scene, Obj, SLOT_NAMES, NUMBERS, FAMILIES, make_scene, render_scene, describe,
                          scene_facts, caption_facts, hallucinations, missing_needs, make_world, world_sample, split_of,
                          vocabulary, words, named_option, mentions_option, plural)

SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

@st.composite
def configs(draw, min_slots=1):
    "Valid world configurations, from one slot to five, with optional extra shape and size."
    n = draw(st.integers(min_slots, 5))
    hi = draw(st.integers(max(1, min_slots - 1), n)); lo = draw(st.integers(0 if hi > 1 else 1, hi))
    shapes = ('circle', 'square', 'triangle') + (('diamond',) if draw(st.booleans()) else ())
    sizes = draw(st.sampled_from([('small', 'large'), ('small', 'medium', 'large')]))
    return WorldConfig(n_slots=n, min_objects=lo, max_objects=hi, shapes=shapes, sizes=sizes,
                       n_choices=draw(st.integers(2, 6)), distractor_sim=draw(st.floats(0, 1)),
                       jitter=draw(st.floats(0, 1)), noise=draw(st.sampled_from([0., .1])))

# worlds that can ask every family: two slots and two shapes at least
world_configs = configs(min_slots=2).filter(lambda c: c.max_objects >= 2)
seeds = st.integers(0, 2**32 - 1)


def solve(question, scene, cfg):
    "The answer to a world question from its text and the scene graph alone (independent of the templates)."
    objs, names = scene['objs'], SLOT_NAMES[scene['n_slots']]
    at = {o['slot']: o for o in objs}
    fits = lambda o, ref: all(w in (o['size'], o['colour'], o['shape']) for w in ref.split())
    def match(ref):
        hits = [o for o in objs if fits(o, ref)]
        assert len(hits) == 1, f'ambiguous or missing referent {ref!r} in {question!r}'
        return hits[0]
    def side_of(side, ref):
        j = match(ref)['slot'] + (-1 if side == 'left' else 1)
        assert 0 <= j < len(names)
        return at.get(j)
    cnt = lambda f: sum(1 for o in objs if f(o))
    sing = lambda p: next(s for s in cfg.shapes if plural(s) == p)
    pick = lambda a, b, x, y: x if a > b else y if b > a else 'same'
    rules = [
        (r'what colour is the shape just (left|right) of the (.+)\?', lambda m: (side_of(*m.groups()) or {}).get('colour', 'nothing')),
        (r'what is just (left|right) of the (.+)\?',
         lambda m: (lambda p: f"{p['colour']} {p['shape']}" if p else 'nothing')(side_of(*m.groups()))),
        (r'what colour is the (.+) shape\?', lambda m: at.get(names.index(m[1]), {}).get('colour', 'nothing')),
        (r'what shape is at the (.+)\?', lambda m: at.get(names.index(m[1]), {}).get('shape', 'nothing')),
        (r'what colour is the (.+)\?', lambda m: match(m[1])['colour']),
        (r'what size is the (.+)\?', lambda m: match(m[1])['size']),
        (r'where is the (.+)\?', lambda m: names[match(m[1])['slot']] if any(fits(o, m[1]) for o in objs) else 'nowhere'),
        (r'how many shapes are there\?', lambda m: NUMBERS[len(objs)]),
        (r'how many more (\w+) shapes than (\w+) shapes are there\?',
         lambda m: NUMBERS[cnt(lambda o: o['colour'] == m[1]) - cnt(lambda o: o['colour'] == m[2])]),
        (r'how many shapes are not (\w+)\?', lambda m: NUMBERS[cnt(lambda o: o['colour'] != m[1])]),
        (r'how many (\w+) shapes are there\?', lambda m: NUMBERS[cnt(lambda o: m[1] in (o['colour'], o['size']))]),
        (r'how many (\w+) would there be if one more (\w+) were added\?', lambda m: NUMBERS[cnt(lambda o: o['shape'] == m[2]) + 1]),
        (r'which are there more of, (\w+) shapes or (\w+) shapes\?',
         lambda m: pick(cnt(lambda o: o['colour'] == m[1]), cnt(lambda o: o['colour'] == m[2]), m[1], m[2])),
        (r'are there more (\w+) than (\w+)\?',
         lambda m: 'yes' if cnt(lambda o: o['shape'] == sing(m[1])) > cnt(lambda o: o['shape'] == sing(m[2])) else 'no'),
        (r'which is bigger, the (.+) or the (.+)\?',
         lambda m: pick(cfg.sizes.index(match(m[1])['size']), cfg.sizes.index(match(m[2])['size']), m[1], m[2])),
    ]
    for pat, f in rules:
        if (m := re.fullmatch(pat, question)): return f(m)
    raise AssertionError(f'no rule for {question!r}')


def texts(s):
    "Every text of a sample the tiny model reads or writes."
    return (s.question, *s.choices, s.meta['caption'], s.rationale)


@settings(**SETTINGS)
@given(seeds, configs())
def test_caption_round_trip(seed, cfg):
    "Any scene's reference caption reads back to exactly that scene's facts, and states no hallucination."
    scene = make_scene(seed, cfg)
    assert caption_facts(describe(scene), cfg) == scene_facts(scene)
    assert hallucinations(describe(scene), scene, cfg) == set()
    assert Scene.from_dict(scene.to_dict()) == scene


@settings(**SETTINGS)
@given(seeds, configs())
def test_render(seed, cfg):
    "Drawing is deterministic and gives an image of the configured size."
    scene = make_scene(seed, cfg)
    im = render_scene(scene, cfg)
    assert im.size == (cfg.image_size, cfg.image_size) and im.mode == 'RGB'
    assert im.tobytes() == render_scene(scene, cfg).tobytes()


@settings(**SETTINGS)
@given(seeds, world_configs, st.sampled_from(['train', 'val', 'test']))
def test_samples_are_correct_and_closed(seed, cfg, split):
    "Every sample: answer right by an independent solver, distinct choices, reasoning ends on the right letter, words in vocabulary."
    voc = set(vocabulary(cfg))
    for s in make_world(8, seed, cfg, split):
        scene = Scene.from_dict(s.meta['scene'])
        assert solve(s.question, s.meta['scene'], cfg) == s.answer_text
        assert 2 <= len(s.choices) <= cfg.n_choices and len(set(s.choices)) == len(s.choices)
        assert s.rationale == s.meta['reasoning']
        assert s.rationale.endswith(f'so the answer is {s.answer_text}, which is option ({s.answer_letter}).')
        assert named_option(s.rationale) == s.answer_letter
        assert mentions_option(s.rationale, s.answer_text)
        assert s.meta['caption'] == describe(scene)
        assert hallucinations(s.meta['caption'], scene, cfg) == set()
        assert missing_needs(s.meta['caption'], s, cfg) == set()
        assert {tuple(f) for f in s.meta['needs']} <= scene_facts(scene)
        assert split_of(scene, cfg) == split
        assert s.domain == s.meta['family'] in FAMILIES and s.id.startswith(f'world-{split}-')
        used = {w for t in texts(s) for w in words(t)}
        assert used <= voc, used - voc


@settings(max_examples=10, deadline=None)
@given(seeds, world_configs)
def test_deterministic(seed, cfg):
    "Same (seed, split, cfg): same samples, same pixels; and a prefix of a longer world."
    a, b = make_world(6, seed, cfg), make_world(3, seed, cfg)
    assert [(s.question, s.choices, s.answer, s.rationale) for s in a[:3]] == [(s.question, s.choices, s.answer, s.rationale) for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))


def test_splits_disjoint_and_balanced():
    "No scene layout is shared between train, val and test; families are exactly balanced; letters near-uniform."
    worlds = {sp: make_world(400, seed=11, split=sp) for sp in ('train', 'val', 'test')}
    lay = {sp: {Scene.from_dict(s.meta['scene']).layout() for s in ss} for sp, ss in worlds.items()}
    assert not (lay['train'] & lay['test'] or lay['train'] & lay['val'] or lay['val'] & lay['test'])
    train = worlds['train']
    assert {f: sum(s.domain == f for s in train) for f in FAMILIES} == {f: 100 for f in FAMILIES}
    four = [s.answer for s in make_world(2000, seed=12) if len(s.choices) == 4]
    counts = [four.count(i) for i in range(4)]
    assert min(counts) > 0.8 * len(four) / 4, counts


def test_hallucinations_and_missing_needs():
    "A wrong attribute is a hallucination; an omitted needed fact is missing; garbage states nothing."
    scene = Scene((Obj(0, 'circle', 'red', 'large'), Obj(2, 'square', 'blue', 'small')))
    cap = describe(scene)
    assert hallucinations(cap.replace('red', 'green'), scene) == {('left', 'colour', 'green')}
    assert hallucinations('middle: large yellow triangle.', scene) == {
        ('middle', 'size', 'large'), ('middle', 'colour', 'yellow'), ('middle', 'shape', 'triangle')}
    assert caption_facts('%%% ((( the the', WorldConfig()) == set() == hallucinations(None, scene)
    s = next(s for s in make_world(40, seed=3) if s.topic == 'count_all')
    assert missing_needs(s.meta['caption'], s) == set()
    first = s.meta['caption'].split('. ')[0]
    assert missing_needs(s.meta['caption'].replace(first, ''), s)


def test_config_errors():
    for kw, msg in [(dict(n_slots=6), 'n_slots'), (dict(max_objects=4), 'max_objects'), (dict(shapes=('circle', 'star')), 'shapes'),
                    (dict(colours=('red', 'Red')), 'distinct'), (dict(n_choices=1), 'n_choices'), (dict(families=('colour',)), 'families')]:
        with pytest.raises(ValueError, match=msg): WorldConfig(**kw)
    with pytest.raises(ValueError, match='split'): make_world(1, split='dev')
    with pytest.raises(ValueError, match='too small'): world_sample(0, cfg=WorldConfig(holdout=0), split='test', tries=50)
