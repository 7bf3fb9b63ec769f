"Tests of stl_nb.data: real M3CoT questions, every bad-input case, loaders and folder round trips, and random malformed records."
import io, json, pickle, subprocess, sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from stl_nb.data import (LETTERS, STL_DOMAINS, Sample, SampleError, Samples, check_sample, fit_image, from_hf, load_folder,
                         load_m3cot, load_scienceqa, m3cot_samples, parse_answer, read_image, samples_from_records,
                         save_folder, scienceqa_samples)

datasets.disable_progress_bars()

# The hub schemas, written out here from the dataset cards (not imported from the library, so the tests check the library
# against the real column names and types).
M3COT_FEATURES = datasets.Features({
    'id': datasets.Value('string'), 'category': datasets.Value('string'), 'image_id': datasets.Value('string'),
    'question': datasets.Value('string'), 'choices': datasets.List(datasets.Value('string')), 'context': datasets.Value('string'),
    'answer': datasets.Value('string'), 'rationale': datasets.Value('string'), 'split': datasets.Value('string'),
    'image': datasets.Image(), 'domain': datasets.Value('string'), 'topic': datasets.Value('string')})
SQA_FEATURES = datasets.Features({
    'image': datasets.Image(), 'question': datasets.Value('string'), 'choices': datasets.List(datasets.Value('string')),
    'answer': datasets.Value('int8'), **{k: datasets.Value('string') for k in
    ('hint', 'task', 'grade', 'subject', 'topic', 'category', 'skill', 'lecture', 'solution')}})


def placeholder(i, size=(64, 48)):
    "A distinct placeholder image for record `i` (the fixture has no images)."
    return Image.new('RGB', size, ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256))

def png_bytes(im, fmt='PNG'):
    b = io.BytesIO(); im.save(b, fmt); return b.getvalue()

def rec(**kw):
    "A good record in the default schema, with `kw` overriding fields."
    return {'id': 'r1', 'image': placeholder(1), 'question': 'Which?', 'choices': ['a', 'b', 'c'], 'answer': 1, **kw}

def fixture_records(m3cot_dir):
    return [json.loads(l) for l in (m3cot_dir/'test_sample.jsonl').read_text(encoding='utf-8').splitlines()]

def m3cot_dataset(records):
    "A Dataset in M3CoT's real schema from fixture-style records (STL domain names, category as topic)."
    rows = [dict(id=r['id'], category=r['topic'], image_id=r['id'], question=r['question'], choices=r['choices'], context='',
                 answer=r['answer'], rationale='', split='test', image=placeholder(i), domain=r['domain'], topic='')
            for i, r in enumerate(records)]
    return datasets.Dataset.from_list(rows, features=M3COT_FEATURES)


# ---------------------------------------------------------------- the 200 real M3CoT questions

def test_m3cot_fixture_every_record_loads_with_its_answer(m3cot_dir):
    records = fixture_records(m3cot_dir)
    assert len(records) == 200
    got = m3cot_samples(m3cot_dataset(records), source='fixture')
    assert got.n_records == 200 and not got.filtered
    # one real data error in M3CoT: answer E for four choices
    assert [(e.record_id, e.field) for e in got.rejected] == [('geography-515', 'answer')]
    assert "'E' is out of range for 4 choices" in str(got.rejected[0])
    by_id = {s.id: s for s in got}
    for i, r in enumerate(records):
        if r['id'] == 'geography-515': continue
        s = by_id[r['id']]
        assert s.answer == LETTERS.index(r['answer']) and s.answer_letter == r['answer']
        assert s.choices == r['choices'] and s.question == r['question'].strip()
        assert (s.domain, s.topic) == (r['domain'], r['topic'])
        assert s.image.mode == 'RGB' and s.image.getpixel((0, 0)) == placeholder(i).getpixel((0, 0))
    assert Counter(s.domain for s in got) == {'commonsense': 50, 'science_natural': 50, 'science_social': 49, 'science_language': 50}

def test_m3cot_fixture_through_records_and_auto_answers(m3cot_dir):
    "The generic core reads the same questions with the answer format guessed ('auto'), and agrees."
    records = fixture_records(m3cot_dir)
    got = samples_from_records([{**r, 'image': placeholder(i)} for i, r in enumerate(records)], source='fixture')
    assert len(got) == 199 and [e.record_id for e in got.rejected] == ['geography-515']
    assert all(s.meta == {'image_file': f"{s.id}.png"} for s in got)   # unmapped keys kept in meta
    assert [s.answer_letter for s in got] == [r['answer'] for r in records if r['id'] != 'geography-515']

def test_m3cot_fixture_domain_selection(m3cot_dir):
    got = m3cot_samples(m3cot_dataset(fixture_records(m3cot_dir)), domains=['science_language'])
    assert len(got) == 50 and {s.domain for s in got} == {'science_language'}
    assert len(got.filtered) == 150 and got.n_records == 200
    assert Counter(r for _, r in got.filtered) == {"domain 'commonsense' not selected": 50, "domain 'science_natural' not selected": 50,
                                                  "domain 'science_social' not selected": 50}


# ---------------------------------------------------------------- M3CoT's and ScienceQA's schemas

def m3cot_row(id, domain, topic, answer='A', choices=('x', 'y')):
    return dict(id=id, category=f'{topic}-cat', image_id=id, question='What?', choices=list(choices), context='Select the best answer.',
                answer=answer, rationale='Because.', split='test', image=placeholder(3), domain=domain, topic=topic)

M3_ROWS = [m3cot_row('c1', 'commonsense', 'physical-commonsense'), m3cot_row('c2', 'commonsense', 'social-commonsense', 'B'),
           m3cot_row('c3', 'commonsense', 'temporal-commonsense'), m3cot_row('n1', 'science', 'natural-science'),
           m3cot_row('s1', 'science', 'social-science', '(b)'), m3cot_row('l1', 'science', 'language-science'),
           m3cot_row('m1', 'mathematics', 'algebra'), m3cot_row('m2', 'mathematics', 'geometry'), m3cot_row('m3', 'mathematics', 'theory'),
           m3cot_row('bad', 'science', 'natural-science', 'E')]

def test_m3cot_schema_stl_domains():
    got = m3cot_samples(datasets.Dataset.from_list(M3_ROWS, features=M3COT_FEATURES))
    assert [(s.id, s.domain) for s in got] == [('c1', 'commonsense'), ('c2', 'commonsense'), ('c3', 'commonsense'),
                                              ('n1', 'science_natural'), ('s1', 'science_social'), ('l1', 'science_language')]
    assert [s.answer for s in got] == [0, 1, 0, 0, 1, 0]
    assert got[0].context == 'Select the best answer.' and got[0].rationale == 'Because.' and got[0].topic == 'physical-commonsense-cat'
    assert got[0].meta == {'image_id': 'c1', 'split': 'test', 'domain': 'commonsense', 'topic': 'physical-commonsense'}
    assert got.filtered == [(m, "'mathematics' is not an STL domain") for m in ('m1', 'm2', 'm3')]
    assert [(e.record_id, e.field) for e in got.rejected] == [('bad', 'answer')]

def test_m3cot_schema_own_domains():
    got = m3cot_samples(datasets.Dataset.from_list(M3_ROWS, features=M3COT_FEATURES), domains='mathematics', stl_domains=False)
    assert [s.id for s in got] == ['m1', 'm2', 'm3'] and {s.topic for s in got} == {'algebra', 'geometry', 'theory'}
    assert len(got.filtered) == 7 and not got.rejected   # filtering comes before validation
    with pytest.raises(ValueError, match='unknown domains'): m3cot_samples(datasets.Dataset.from_list(M3_ROWS, features=M3COT_FEATURES), domains=['maths'])

def test_scienceqa_schema():
    rows = [dict(image=placeholder(i) if i % 2 == 0 else None, question=f'Q{i}?', choices=['yes', 'no'], answer=i % 2, hint=f'hint {i}',
                 task='closed choice', grade='grade3', subject='natural science', topic='physics', category='c', skill='s',
                 lecture='L', solution=f'solution {i}') for i in range(6)]
    got = scienceqa_samples(datasets.Dataset.from_list(rows, features=SQA_FEATURES), source='scienceqa:test')
    assert [(s.id, s.answer, s.context, s.rationale, s.domain) for s in got] == [
        (f'scienceqa:test-{i}', 0, f'hint {i}', f'solution {i}', 'natural science') for i in (0, 2, 4)]
    assert got.filtered == [(f'scienceqa:test-{i}', 'no image') for i in (1, 3, 5)]
    assert got[0].meta['lecture'] == 'L' and got.n_records == 6

def test_hub_wrappers_are_thin(monkeypatch):
    "load_m3cot / load_scienceqa only fetch and cut the split; the hub call is replaced here, nothing is downloaded."
    calls = []
    m3 = datasets.Dataset.from_list(M3_ROWS, features=M3COT_FEATURES)
    def fake_load(name, split): calls.append((name, split)); return m3
    monkeypatch.setattr(datasets, 'load_dataset', fake_load)
    got = load_m3cot('train', limit=4)
    assert calls == [('LightChen2333/M3CoT', 'train')] and got.source == 'm3cot:train' and got.n_records == 4
    sqa = datasets.Dataset.from_list([dict(image=placeholder(0), question='Q?', choices=['a', 'b'], answer=1, hint='', task='', grade='',
                                           subject='', topic='', category='', skill='', lecture='', solution='')], features=SQA_FEATURES)
    monkeypatch.setattr(datasets, 'load_dataset', lambda name, split: sqa)
    got = load_scienceqa('validation', limit=10)
    assert got.source == 'scienceqa:validation' and [s.id for s in got] == ['scienceqa:validation-0']

def test_from_hf_names_missing_columns():
    ds = datasets.Dataset.from_dict({'img': [placeholder(0)], 'text': ['Q?'], 'answer': [0]})
    with pytest.raises(ValueError) as e: from_hf(ds)
    msg = str(e.value)
    assert "image (column 'image')" in msg and "question (column 'question')" in msg and "choices (column 'choices')" in msg
    assert 'answer' not in msg.split('its columns')[0] and "['img', 'text', 'answer']" in msg
    with pytest.raises(TypeError, match='one split'): from_hf(datasets.DatasetDict({'test': ds}))

def test_from_hf_corrupt_image_is_rejected_not_raised():
    "A corrupt image inside a datasets Image column is one rejected record, not an exception from datasets' decoding."
    ds = datasets.Dataset.from_dict({'image': [{'bytes': png_bytes(placeholder(0)), 'path': None}, {'bytes': b'\x89PNG\r\n\x1a\nxx', 'path': None}],
                                     'question': ['Q?', 'Q?'], 'choices': [['a', 'b']] * 2, 'answer': [0, 1]},
                                    features=datasets.Features({'image': datasets.Image(), 'question': datasets.Value('string'),
                                                                'choices': datasets.List(datasets.Value('string')), 'answer': datasets.Value('int64')}))
    got = from_hf(ds, source='t')
    assert len(got) == 1 and [(e.record_id, e.field) for e in got.rejected] == [('t-1', 'image')]


# ---------------------------------------------------------------- every bad input, named

TRUNCATED_PNG = png_bytes(placeholder(2, (64, 64)))[:60]
BAD = [  # (case, record, expected record id, field, fragment of the message)
    ('not a dict',             ['a', 'b'],                                   'record-0', 'record',   'expected a dict, got list'),
    ('no image key',           {k: v for k, v in rec().items() if k != 'image'}, 'r1', 'image',  "no key 'image'"),
    ('image None',             rec(image=None),                              'r1', 'image',    'missing'),
    ('image empty bytes',      rec(image=b''),                               'r1', 'image',    'missing'),
    ('image not an image',     rec(image=b'GIF89a nonsense'),                'r1', 'image',    'cannot decode'),
    ('image truncated',        rec(image=TRUNCATED_PNG),                     'r1', 'image',    'cannot decode'),
    ('image dict, no data',    rec(image={'bytes': None, 'path': None}),     'r1', 'image',    'missing'),
    ('image file absent',      rec(image='no/such.png'),                     'r1', 'image',    "'no/such.png' not found"),
    ('image wrong type',       rec(image=3.5),                               'r1', 'image',    'got float'),
    ('image 0 pixels',         rec(image=Image.new('RGB', (0, 10))),         'r1', 'image',    'empty (0x10 pixels)'),
    ('image 1000:1',           rec(image=Image.new('RGB', (2000, 2))),       'r1', 'image',    'aspect ratio 1000:1'),
    ('no question key',        {k: v for k, v in rec().items() if k != 'question'}, 'r1', 'question', "no key 'question'"),
    ('question None',          rec(question=None),                           'r1', 'question', 'missing'),
    ('question blank',         rec(question=' \n\t'),                        'r1', 'question', 'empty'),
    ('question not UTF-8',     rec(question=b'caf\xe9?'),                    'r1', 'question', 'not valid UTF-8'),
    ('question a number',      rec(question=42),                             'r1', 'question', 'expected text, got int'),
    ('choices None',           rec(choices=None),                            'r1', 'choices',  'missing'),
    ('choices a string',       rec(choices='a, b, c'),                       'r1', 'choices',  'expected a list of option texts, got str'),
    ('no choices',             rec(choices=[]),                              'r1', 'choices',  'at least 2 choices, got 0'),
    ('one choice',             rec(choices=['a']),                           'r1', 'choices',  'at least 2 choices, got 1'),
    ('empty choice',           rec(choices=['a', ' ', 'c']),                 'r1', 'choices',  'option B is empty'),
    ('None choice',            rec(choices=['a', None, 'c']),                'r1', 'choices',  'option B is empty'),
    ('choice not UTF-8',       rec(choices=['a', b'\xff', 'c']),             'r1', 'choices',  'option B: not valid UTF-8'),
    ('choice an image',        rec(choices=['a', Image.new('RGB', (2, 2))]), 'r1', 'choices',  'option B: expected text'),
    ('duplicate choices',      rec(choices=['a', 'b', ' a']),                'r1', 'choices',  "options A and C are the same text 'a'"),
    ('duplicate, spacing',     rec(choices=['big  dog', 'cat', 'big dog']),  'r1', 'choices',  'options A and C'),
    ('27 choices',             rec(choices=[f'c{i}' for i in range(27)]),    'r1', 'choices',  'more than the 26 option letters'),
    ('no answer key',          {k: v for k, v in rec().items() if k != 'answer'}, 'r1', 'answer', "no key 'answer'"),
    ('answer None',            rec(answer=None),                             'r1', 'answer',   'missing'),
    ('answer NaN',             rec(answer=float('nan')),                     'r1', 'answer',   'missing'),
    ('answer out of range',    rec(answer=3),                                'r1', 'answer',   'out of range for 3 choices (A..C)'),
    ('answer negative',        rec(answer=-1),                               'r1', 'answer',   'out of range'),
    ('answer letter too far',  rec(answer='D'),                              'r1', 'answer',   "'D' is out of range"),
    ('answer not a whole',     rec(answer=1.5),                              'r1', 'answer',   'not a whole-number'),
    ('answer a bool',          rec(answer=True),                             'r1', 'answer',   'got True'),
    ('answer unknown text',    rec(answer='purple'),                         'r1', 'answer',   'neither an option letter nor the text'),
    ('answer bare number',     rec(answer='7'),                              'r1', 'answer',   "pass answer_as='index'"),
    ('answer ambiguous',       rec(choices=['C', 'A', 'B'], answer='A'),     'r1', 'answer',   'ambiguous'),
    ('answer a list',          rec(answer=[1]),                              'r1', 'answer',   'got list'),
    ('context not UTF-8',      rec(context=b'\xc3\x28'),                     'r1', 'context',  'not valid UTF-8'),
    ('rationale a list',       rec(rationale=['x']),                         'r1', 'rationale', 'expected text, got list'),
    ('domain not UTF-8',       rec(domain=b'\x80'),                          'r1', 'domain',   'not valid UTF-8'),
    ('meta not a dict',        rec(meta='x'),                                'r1', 'meta',     'expected a dict, got str'),
    ('id a list',              rec(id=['r1']),                               None, 'id',       'expected a non-empty text or int id'),
]

@pytest.mark.parametrize('case,record,rid,fld,fragment', BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_naming_record_and_field(case, record, rid, fld, fragment):
    got = samples_from_records([record])
    assert len(got) == 0 and got.n_records == 1 and len(got.rejected) == 1
    e = got.rejected[0]
    assert (e.record_id, e.field) == (rid, fld), str(e)
    assert fragment in e.message, str(e)
    assert str(e).startswith(f"record {rid!r}, field {fld!r}: ")

def test_bad_inputs_are_also_errors_of_check_sample():
    with pytest.raises(SampleError, match="record 'q', field 'choices'"): check_sample(Sample('q', placeholder(0), 'Q?', ['a'], 0))
    with pytest.raises(SampleError, match="field 'answer'.*not a choice index"): check_sample(Sample('q', placeholder(0), 'Q?', ['a', 'b'], 'B'))
    assert check_sample(Sample('q', placeholder(0), 'Q?', ['a', 'b'], 'B'), answer_as='letter').answer == 1

def test_duplicate_ids_and_generated_ids():
    got = samples_from_records([rec(id='x'), rec(id='x'), rec(id=None), rec(id=''), rec(id=7)], source='s')
    assert [s.id for s in got] == ['x', 's-2', 's-3', '7']
    assert [(e.record_id, e.field, e.message) for e in got.rejected] == [('x', 'id', 'duplicate id')]

def test_answer_forms():
    ch = ['red', 'blue', 'green']
    for v in (1, '1', 'B', 'b', '(B)', '(b)', 'B.', 'blue', ' BLUE ', 1.0, b'B'):
        assert parse_answer(v, ch, 'index' if v == '1' else 'auto') == 1, v
    assert parse_answer('b', ['B', 'b'], 'text') == 1            # exact text beats case-insensitive
    assert parse_answer('3', ['3', '2', '0', '1'], 'text') == 0   # M3CoT counts as option texts
    with pytest.raises(SampleError, match='not an option letter'): parse_answer('blue', ch, 'letter')
    with pytest.raises(SampleError, match='not the text of any choice'): parse_answer('B', ch, 'text')
    with pytest.raises(ValueError, match='answer_as'): parse_answer(1, ch, 'number')


# ---------------------------------------------------------------- image conversion and sizes

def _rgba_square():
    im = Image.new('RGBA', (40, 40), (0, 0, 0, 0)); im.paste((10, 20, 30, 255), (0, 0, 20, 40)); return im

def _palette_transparent():
    im = Image.new('P', (40, 40), 0); im.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762); im.paste(1, (0, 0, 20, 40))
    im.info['transparency'] = 0; return im

MODES = [  # (case, image, expected pixel at (5, 5), expected pixel at (35, 35))
    ('RGB',        Image.new('RGB', (40, 40), (1, 2, 3)),          (1, 2, 3),     (1, 2, 3)),
    ('L',          Image.new('L', (40, 40), 128),                  (128,) * 3,    (128,) * 3),
    ('1',          Image.new('1', (40, 40), 1),                    (255,) * 3,    (255,) * 3),
    ('CMYK',       Image.new('CMYK', (40, 40), (0, 255, 255, 0)),  (255, 0, 0),   (255, 0, 0)),
    ('P',          Image.new('RGB', (40, 40), (0, 0, 255)).convert('P'), (0, 0, 255), (0, 0, 255)),
    ('P+transp.',  _palette_transparent(),                         (200, 0, 0),   (255,) * 3),
    ('LA',         Image.new('LA', (40, 40), (0, 0)),              (255,) * 3,    (255,) * 3),
    ('RGBA',       _rgba_square(),                                 (10, 20, 30),  (255,) * 3),
    ('I;16',       Image.new('I;16', (40, 40), 65535),             (255,) * 3,    (255,) * 3),
    ('I',          Image.new('I', (40, 40), 1000),                 (255,) * 3,    (255,) * 3),
    ('F',          Image.new('F', (40, 40), 0.5),                  (127,) * 3,    (127,) * 3),
]

@pytest.mark.parametrize('case,im,p1,p2', MODES, ids=[m[0] for m in MODES])
def test_modes_become_rgb(case, im, p1, p2):
    s = check_sample(Sample('m', im, 'Q?', ['a', 'b'], 0))
    assert s.image.mode == 'RGB' and s.image.size == (40, 40) and type(s.image) is Image.Image
    assert (s.image.getpixel((5, 5)), s.image.getpixel((35, 35))) == (p1, p2)
    assert s.meta == ({} if case == 'RGB' else {'image_original': {'mode': im.mode, 'size': [40, 40]}})

@pytest.mark.parametrize('fmt,mode', [('JPEG', 'CMYK'), ('PNG', 'I;16'), ('PNG', 'LA'), ('GIF', 'P'), ('TIFF', 'CMYK'), ('BMP', '1'), ('WEBP', 'RGBA')])
def test_modes_from_files(tmp_path, fmt, mode):
    im = Image.new(mode, (30, 30))
    (tmp_path/f'x.{fmt.lower()}').write_bytes(png_bytes(im, fmt))
    s = samples_from_records([rec(image=f'x.{fmt.lower()}')], base_dir=tmp_path)
    assert len(s) == 1 and s[0].image.mode == 'RGB' and s[0].image.size == (30, 30)

@pytest.mark.parametrize('size,expected', [((1, 1), (28, 28)), ((10, 20), (28, 56)), ((28, 28), (28, 28)), ((4096, 1024), (2048, 512)),
                                           ((1024, 4096), (512, 2048)), ((2048, 2048), (2048, 2048)), ((3, 300), (20, 2048)),
                                           ((1, 200), (10, 2048)), ((3000, 16), (2048, 11))])
def test_sizes(size, expected):
    s = check_sample(Sample('s', Image.new('RGB', size, 'red'), 'Q?', ['a', 'b'], 0))
    assert s.image.size == expected and s.image.getpixel((0, 0)) == (255, 0, 0)
    assert ('image_original' in s.meta) == (size != expected)

def test_size_limits_are_options():
    assert fit_image(Image.new('RGB', (1000, 500)), max_side=100).size == (100, 50)
    assert fit_image(Image.new('RGB', (1, 1)), min_side=1).size == (1, 1)
    with pytest.raises(ValueError): fit_image(Image.new('RGB', (5, 5)), max_side=10, min_side=20)

def test_read_image_forms(tmp_path):
    im = placeholder(5, (32, 32)); data = png_bytes(im)
    (tmp_path/'sub').mkdir(); (tmp_path/'sub'/'a.png').write_bytes(data)
    for v in (im, data, bytearray(data), memoryview(data), {'bytes': data, 'path': None}, {'bytes': None, 'path': str(tmp_path/'sub'/'a.png')},
              tmp_path/'sub'/'a.png', str(tmp_path/'sub'/'a.png')):
        assert read_image(v).convert('RGB').getpixel((3, 3)) == im.getpixel((3, 3))
    assert read_image('sub/a.png', base_dir=tmp_path).size == (32, 32)
    with pytest.raises(SampleError, match='cannot read image file'): read_image(tmp_path/'sub')   # a directory


def test_exif_orientation_is_applied_like_datasets():
    "A photo stored sideways with an EXIF orientation tag is turned upright, as datasets' own Image decoding does."
    im = Image.new('RGB', (60, 30), 'green'); exif = im.getexif(); exif[0x0112] = 6   # 6: rotate 90 degrees to view
    b = io.BytesIO(); im.save(b, 'JPEG', exif=exif)
    assert read_image(b.getvalue()).size == (30, 60)
    ds = datasets.Dataset.from_dict({'image': [{'bytes': b.getvalue(), 'path': None}]}, features=datasets.Features({'image': datasets.Image()}))
    assert ds[0]['image'].size == (30, 60)


# ---------------------------------------------------------------- Samples

def test_samples_accounting_and_report():
    got = samples_from_records([rec(id='a', domain='x'), rec(id='b', answer=9), rec(id='c', question=''), 'junk', rec(id='e', image=None)],
                               source='demo', skip=lambda f: 'no image' if f['image'] is None else None)
    assert (len(got), len(got.rejected), len(got.filtered), got.n_records) == (1, 3, 1, 5)
    assert repr(got) == "Samples('demo': 1 kept, 3 rejected, 1 filtered)"
    r = got.report()
    assert r.splitlines()[0] == 'demo: 5 records -> 1 kept, 3 rejected, 1 filtered'
    assert 'kept by domain: x 1' in r and 'filtered by reason: no image 1' in r
    assert "record 'b', field 'answer'" in r and 'rejected by field: answer 1, question 1, record 1' in r
    assert got.report(n=1).count('record ') == 2 and '... and 2 more' in got.report(n=1)

def test_errors_pickle_and_samples_pickle():
    e = SampleError('r', 'image', 'missing')
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.record_id, e2.field, e2.message, str(e2)) == ('r', 'image', 'missing', str(e))
    got = samples_from_records([rec(), rec(id='b', choices=[])], source='p')
    back = pickle.loads(pickle.dumps(got))
    assert list(back) == list(got) and back.source == 'p' and [str(x) for x in back.rejected] == [str(x) for x in got.rejected]

def test_mapping_functions_and_errors():
    got = samples_from_records([rec(id='a', n=1), rec(id='b', n=2)], {'id': lambda r: f"{r['id']}{r['n']}"})
    assert [s.id for s in got] == ['a1', 'b2']
    got = samples_from_records([rec(id='a', d='Sci'), rec(id='b')], {'domain': lambda r: r['d'].lower()})
    assert [s.domain for s in got] == ['sci'] and [(e.record_id, e.field) for e in got.rejected] == [('b', 'domain')]
    assert 'mapping function failed (KeyError' in got.rejected[0].message
    with pytest.raises(ValueError, match='not Sample fields'): samples_from_records([], {'label': 'answer'})

def test_import_is_light():
    "Importing stl_nb.data does not import datasets (loaders import it when called)."
    out = subprocess.run([sys.executable, '-c', "import sys, stl_nb.data; print('datasets' in sys.modules, 'torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'False']


# ---------------------------------------------------------------- folders: save_folder, JSONL, parquet, save_to_disk

def some_samples():
    recs = [rec(id='q/1', question='Wie viele Äpfel?  ', choices=['eins', 'zwei'], answer=0, context='ctx', domain='d1', topic='t',
                rationale='r', meta={'round': 2, 'tags': ['a'], 'nested': {'x': 1.5}}),
            rec(id='Q_1', image=Image.new('RGBA', (50, 20), (255, 0, 0, 128)), choices=['EE', 'Ee', 'ee'], answer='C'),
            rec(id='q 1', image=Image.new('L', (3, 3), 7)),
            rec(id='big', image=Image.new('RGB', (3000, 1000), 'navy'))]
    got = samples_from_records(recs, source='mix')
    assert len(got) == 4
    return got

def test_save_folder_round_trip(tmp_path):
    s = some_samples()
    jf = save_folder(s, tmp_path/'out')
    assert jf == tmp_path/'out'/'samples.jsonl'
    assert sorted(p.name for p in (tmp_path/'out'/'images').iterdir()) == ['Q_1-2.png', 'big.png', 'q_1-3.png', 'q_1.png']
    back = load_folder(tmp_path/'out')
    assert list(back) == list(s) and back.source == 'out' and not back.rejected
    assert back[1].meta['image_original'] == {'mode': 'RGBA', 'size': [50, 20]} and back[3].image.size == (2048, 683)
    assert load_folder(jf) == back   # the file itself works too
    with pytest.raises(FileExistsError): save_folder(s, tmp_path/'out')
    save_folder(s[:1], tmp_path/'out', overwrite=True)
    assert len(load_folder(tmp_path/'out')) == 1

def test_jsonl_with_relative_paths_and_bad_lines(tmp_path):
    (tmp_path/'imgs').mkdir()
    placeholder(1).save(tmp_path/'imgs'/'a.png')
    lines = [json.dumps({'id': 'a', 'img': 'imgs/a.png', 'question': 'Q?', 'choices': ['x', 'y'], 'answer': 'B'}),
             '', '{"id": "b", "img": ',
             json.dumps({'id': 'c', 'img': 'imgs/missing.png', 'question': 'Q?', 'choices': ['x', 'y'], 'answer': 'B'}),
             '   ']
    data = '\n'.join(lines).encode() + b'\n{"id": "d", "question": "caf\xe9"}\n'
    (tmp_path/'qs.jsonl').write_bytes(data)
    got = load_folder(tmp_path, {'image': 'img'})   # the folder's only .jsonl
    assert [s.id for s in got] == ['a'] and got[0].answer == 1 and got.n_records == 4
    assert [(e.record_id, e.field) for e in got.rejected] == [('qs.jsonl:3', 'record'), ('c', 'image'), ('qs.jsonl:6', 'record')]
    assert 'line 3 is not valid JSON' in got.rejected[0].message and 'line 6 is not valid UTF-8' in got.rejected[2].message

def test_load_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError): load_folder(tmp_path/'nothing')
    (tmp_path/'a.jsonl').write_text(''); (tmp_path/'b.jsonl').write_text('')
    with pytest.raises(ValueError, match='one .jsonl'): load_folder(tmp_path)

def hf_dataset_from_files(tmp_path, n=4):
    "A Dataset in M3CoT's schema whose images were given as file paths (as a folder-built dataset has them)."
    (tmp_path/'imgs').mkdir()
    rows = []
    for i in range(n):
        placeholder(i).save(tmp_path/'imgs'/f'{i}.png')
        rows.append(m3cot_row(f'id{i}', 'science', 'natural-science', LETTERS[i % 2]) | {'image': str(tmp_path/'imgs'/f'{i}.png')})
    return datasets.Dataset.from_list(rows, features=M3COT_FEATURES)

def test_parquet_round_trip_embeds_pil_images(tmp_path):
    ds = datasets.Dataset.from_list(M3_ROWS, features=M3COT_FEATURES)
    ds.to_parquet(tmp_path/'m3.parquet')
    got = load_folder(tmp_path/'m3.parquet', answer_as='letter', source='pq')
    assert got.n_records == len(M3_ROWS) and len(got) == 9 and [e.record_id for e in got.rejected] == ['bad']
    assert list(got) == list(from_hf(ds, answer_as='letter', source='pq'))

def test_parquet_of_file_images_stores_only_paths(tmp_path):
    "to_parquet() keeps only the paths of images that came from files: they load while the files exist, and not after."
    ds = hf_dataset_from_files(tmp_path)
    (tmp_path/'pq').mkdir()
    ds.select(range(2)).to_parquet(tmp_path/'pq'/'part-0.parquet'); ds.select(range(2, 4)).to_parquet(tmp_path/'pq'/'part-1.parquet')
    got = load_folder(tmp_path/'pq')   # a folder of parquet files, read in name order
    assert [s.id for s in got] == ['id0', 'id1', 'id2', 'id3'] and [s.answer for s in got] == [0, 1, 0, 1]
    for p in (tmp_path/'imgs').iterdir(): p.unlink()
    gone = load_folder(tmp_path/'pq')
    assert len(gone) == 0 and {e.field for e in gone.rejected} == {'image'} and 'not found' in gone.rejected[0].message

def test_save_to_disk_stores_image_bytes(tmp_path):
    ds = hf_dataset_from_files(tmp_path)
    ds.save_to_disk(tmp_path/'saved')
    datasets.DatasetDict({'train': ds, 'test': ds.select(range(1))}).save_to_disk(tmp_path/'saved_dict')
    for p in (tmp_path/'imgs').iterdir(): p.unlink()
    got = load_folder(tmp_path/'saved')
    assert [s.id for s in got] == ['id0', 'id1', 'id2', 'id3'] and not got.rejected
    assert got[2].image.getpixel((0, 0)) == placeholder(2).getpixel((0, 0))
    assert [s.id for s in load_folder(tmp_path/'saved_dict', split='test')] == ['id0']
    with pytest.raises(ValueError, match='pass split='): load_folder(tmp_path/'saved_dict')


# ---------------------------------------------------------------- random malformed records never raise

_GOOD_PNG = png_bytes(placeholder(9, (30, 30)))
images = st.one_of(st.none(), st.just(_GOOD_PNG), st.binary(max_size=64), st.just(TRUNCATED_PNG), st.text(max_size=20),
                   st.builds(lambda m, w, h: Image.new(m, (w, h)), st.sampled_from(['RGB', 'RGBA', 'L', 'LA', 'P', '1', 'CMYK', 'I;16', 'I', 'F']),
                             st.integers(0, 40), st.integers(0, 40)),
                   st.fixed_dictionaries({'bytes': st.one_of(st.none(), st.just(_GOOD_PNG), st.binary(max_size=16)),
                                          'path': st.one_of(st.none(), st.text(max_size=10))}),
                   st.integers(), st.lists(st.integers(), max_size=2))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 30), st.floats(allow_nan=True), st.text(max_size=12),
                    st.binary(max_size=12), st.sampled_from(['A', '(b)', 'c.', 'Z', '', ' ', '0', '1']))
choice_lists = st.one_of(scalars, st.lists(st.one_of(scalars, st.sampled_from(['a', 'b', 'A', ' a '])), max_size=30),
                         st.tuples(st.text(max_size=5), st.text(max_size=5)), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
def weighted(*pairs):
    "One of the strategies, drawn with the given weights (st.one_of would weigh equal ones as one)."
    return st.sampled_from([i for i, (w, _) in enumerate(pairs) for _ in range(w)]).flatmap(lambda i: pairs[i][1])

def mostly(good, bad): return weighted((3, good), (1, bad))   # a field is good three times out of four

good_images = st.one_of(st.just(_GOOD_PNG), st.builds(lambda m, w, h: Image.new(m, (w, h)), st.sampled_from(['RGB', 'RGBA', 'P', 'L']),
                                                      st.integers(1, 60), st.integers(1, 60)))
good_choices = st.lists(st.text(min_size=1, max_size=6).filter(str.strip), min_size=2, max_size=5, unique_by=lambda c: ' '.join(c.split()))
near_good = st.builds(lambda d, drop: {k: v for k, v in d.items() if k not in drop},   # a good record with a few fields broken or dropped
    st.fixed_dictionaries({'id': mostly(st.one_of(st.text('abcxyz', min_size=1, max_size=3), st.integers(0, 9)), st.one_of(scalars, st.lists(st.integers(), max_size=1))),
                           'image': mostly(good_images, images), 'question': mostly(st.sampled_from(['Q?', ' Wie? ', 'ü\n?']), scalars),
                           'choices': mostly(good_choices, choice_lists), 'answer': mostly(st.sampled_from([0, 1, 'A', '(b)', 1.0]), scalars)},
                          optional={'context': scalars, 'domain': scalars, 'rationale': scalars, 'other': scalars,
                                    'meta': st.one_of(scalars, st.dictionaries(st.text(max_size=3), scalars, max_size=2))}),
    st.sets(st.sampled_from(['id', 'image', 'question', 'choices', 'answer']), max_size=1))
anything = st.one_of(st.fixed_dictionaries({}, optional={'id': scalars, 'image': images, 'question': scalars, 'choices': choice_lists,
                                                         'answer': scalars, 'topic': scalars}),
                     scalars, st.lists(scalars, max_size=2))
records = weighted((3, near_good), (1, anything))

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=8), st.sampled_from(['auto', 'index', 'letter', 'text']))
def test_random_malformed_records_never_raise(recs, answer_as):
    got = samples_from_records(recs, source='fuzz', answer_as=answer_as)
    assert isinstance(got, Samples) and got.n_records == len(recs) and not got.filtered
    assert all(isinstance(e, SampleError) and e.field in ('record', 'id', 'image', 'question', 'choices', 'answer', 'context',
                                                          'domain', 'topic', 'rationale', 'meta') for e in got.rejected)
    for s in got:   # whatever was kept is a valid sample
        assert isinstance(s.id, str) and s.id and isinstance(s.question, str) and s.question
        assert 2 <= len(s.choices) <= 26 and len(set(s.choices)) == len(s.choices) and 0 <= s.answer < len(s.choices)
        assert s.image.mode == 'RGB' and max(s.image.size) <= 2048 and type(s.image) is Image.Image
    assert len({s.id for s in got}) == len(got)
    got.report()
