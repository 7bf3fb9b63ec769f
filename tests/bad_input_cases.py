"""The bad-input catalogue of chapter 14a: every kind of broken data, configuration, disk or model output the library
knows about, as `Case`s whose outcome is whatever the library does when they run. A test fixture, not the library:
`tests/test_bad_input.py` runs each case and checks its message, and chapter 14a shows the table (it puts `tests/` on
`sys.path` to import this file). The disk cases patch with pytest's `MonkeyPatch`; every folder a case makes is a
`TemporaryDirectory`, gone when the case ends."""
from __future__ import annotations
import contextlib, errno, io, json, os, shutil, tempfile
from dataclasses import dataclass, replace
from pathlib import Path
import pandas as pd
import pytest
from PIL import Image
import stl_nb
from stl_nb.data import Samples, samples_from_records, from_hf
from stl_nb.templates import positive_prompt, render_rationale, parse_rationale, Rationale
from stl_nb.keep import judge, DROP_REASONS
from stl_nb.generate import GenConfig
from stl_nb.loop import STLConfig, tiny_config, check_run, prepare_out, load_model, fit_context, run_stl, Run
from stl_nb.cli import _main

EMBEDDED = Path(stl_nb.__file__).parent/'assets'/'embedded'   # the shipped model's folder (chapter 04)

@dataclass
class Case:
    "One bad input: its name, what it reaches, a function producing the outcome, and a fragment the message must contain."
    name: str
    part: str        # 'data', 'image', 'prompt', 'run', 'disk', 'model', 'model output'
    run: object      # () -> Samples (its rejected records), str (what was done), or raises
    expect: str      # a fragment of the message

def outcome(c:Case) -> dict:
    "Run case `c`: what kind of answer it gets (rejected, refused, handled, exit) and the message."
    try: got = c.run()
    except SystemExit as e: return dict(result=f'exit {e.code}', message=getattr(e, 'stderr', ''))
    except Exception as e: return dict(result=f'refused: {type(e).__name__}', message=str(e))
    if isinstance(got, Samples):
        if got.rejected: return dict(result='rejected', message=str(got.rejected[0]))
        return dict(result='kept', message=f"{len(got)} sample(s) kept")
    return dict(result='handled', message=str(got))

# ---------------------------------------------------------------- data and images: one field of a good record changed
def _img(mode='RGB', size=(40, 40)): return Image.new(mode, size)

def _rec(**kw) -> dict:
    "A good record, with `kw` overriding fields."
    good = {'id': 'q1', 'image': _img(), 'question': 'Which shape is red?', 'choices': ['circle', 'square', 'star'], 'answer': 1}
    return {**good, **kw}

def _load(**kw) -> Samples: return samples_from_records([_rec(**kw)])

def _png(im) -> bytes:
    b = io.BytesIO()
    im.save(b, 'PNG')
    return b.getvalue()

def _became(im) -> str:
    "What a usable but unusual image becomes."
    s = samples_from_records([_rec(image=im)])
    if not len(s): return s
    o = s[0].meta.get('image_original', {'mode': im.mode, 'size': list(im.size)})
    return f"kept as RGB {s[0].image.size[0]}x{s[0].image.size[1]} (was {o['mode']} {o['size'][0]}x{o['size'][1]})"

def _palette(): return Image.new('RGB', (40, 40), (200, 0, 0)).convert('P')

def _rtl() -> str:
    "A right-to-left question and options, rendered into a prompt and read back from a conclusion."
    ch = ['עיגול', 'ריבוע', 'כוכב']
    s = samples_from_records([_rec(question='איזו צורה אדומה?', choices=ch)])[0]
    assert 'איזו צורה אדומה?' in positive_prompt(s) and '(B) ריבוע' in positive_prompt(s)
    r = parse_rationale(render_rationale(Rationale('צורה אדומה', 'כי', 1), ch), ch)
    return f"kept; the prompt shows '(B) {ch[1]}' and the conclusion reads back as option {'ABC'[r.answer]}"

def _long_question():
    s = samples_from_records([_rec(question='Why? ' * 10_000)])
    return fit_context(s, tiny_config(), 'test')

def _no_columns():
    import datasets
    return from_hf(datasets.Dataset.from_dict({'picture': [_img()], 'text': ['Q?'], 'label': [0]}))

# ---------------------------------------------------------------- runs
def _other_run():
    with tempfile.TemporaryDirectory(prefix='stl-bad-') as d:
        cfg = tiny_config(out=str(Path(d)/'run'))
        prepare_out(cfg)
        return prepare_out(replace(cfg, method='star'))

def _rounds_zero():
    r = Run(tiny_config(rounds=0), Path('unused'))
    return f"runs round 0 only (the base model, scored): {r.n_rounds} training rounds"

# ---------------------------------------------------------------- disks
def _cli(f, prog='stl_run'):
    "Run `f` as the command line does (`_main`), raising its `SystemExit` with the error line attached as `stderr`."
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: _main(prog, f)
        except SystemExit as e:
            e.stderr = err.getvalue().strip().splitlines()[-1]   # the error line, after any progress bar
            raise
    return 'no error'

def _read_only():
    "`mkdir` fails as on a read-only file system (`chmod` does not stop root, and CI runs as root)."
    def refuse(self, *a, **k): raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
    with tempfile.TemporaryDirectory(prefix='stl-bad-') as d, pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, 'mkdir', refuse)
        return _cli(lambda: prepare_out(tiny_config(out=str(Path(d)/'run'))))

def _full_disk():
    "A run whose disk fills at the second batch of test answers: one line, and the first batch kept."
    import stl_nb.generate as g
    real, calls = g._append, []
    def append(f, records):
        calls.append(1)
        if len(calls) == 2: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
        real(f, records)
    with tempfile.TemporaryDirectory(prefix='stl-bad-') as d:
        cfg = tiny_config(out=str(Path(d)/'run'), rounds=0, test_limit=8, eval_gen=GenConfig(max_new_tokens=16, batch_size=4))
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(g, '_append', append)
                _cli(lambda: run_stl(cfg, progress=False))
        except SystemExit as e:
            kept = len(Path(cfg.out, 'round_0', 'test.jsonl').read_text().splitlines())
            e.stderr += f" [test.jsonl keeps {kept} records]"
            raise
    return 'no error'

# ---------------------------------------------------------------- models and what they say
def _no_template():
    with tempfile.TemporaryDirectory(prefix='stl-bad-') as tmp:
        d = Path(tmp)/'model'
        shutil.copytree(EMBEDDED, d)
        (d/'chat_template.jinja').unlink(missing_ok=True)
        for f in ('tokenizer_config.json', 'processor_config.json'):
            c = json.loads((d/f).read_text())
            c.pop('chat_template', None)
            (d/f).write_text(json.dumps(c))
        return load_model(tiny_config(model=str(d)))

def _reply(raw:str, finished:bool=True) -> str:
    "The filter's verdict on a reply `raw` to the good record's question (gold: (B) square)."
    s = samples_from_records([_rec()])[0]
    why = judge(dict(id='q1', kind='positive', wrong=None, k=0, raw=raw, finished=finished), s)
    return f"dropped from training: {why} ({DROP_REASONS[why]})"

CASES = [
    Case('missing image bytes',         'image',  lambda: _load(image=b''),                  "field 'image': missing"),
    Case('corrupt image bytes',         'image',  lambda: _load(image=_png(_img())[:60]),    "cannot decode"),
    Case('CMYK image',                  'image',  lambda: _became(_img('CMYK')),              "kept as RGB 40x40 (was CMYK"),
    Case('palette image',               'image',  lambda: _became(_palette()),                "kept as RGB 40x40 (was P"),
    Case('grayscale image',             'image',  lambda: _became(_img('L')),                 "kept as RGB 40x40 (was L"),
    Case('RGBA image',                  'image',  lambda: _became(_img('RGBA')),              "kept as RGB 40x40 (was RGBA"),
    Case('1x1 image',                   'image',  lambda: _became(_img('RGB', (1, 1))),       "kept as RGB 28x28 (was RGB 1x1)"),
    Case('12000x12000 image',           'image',  lambda: _became(_img('L', (12000, 12000))), "kept as RGB 2048x2048 (was L 12000x12000)"),
    Case('fewer than two choices',      'data',   lambda: _load(choices=['circle']),         "at least 2 choices, got 1"),
    Case('duplicate choices',           'data',   lambda: _load(choices=['circle', 'star', 'circle']),
         "options A and C are the same text"),
    Case('empty choice',                'data',   lambda: _load(choices=['circle', '', 'star']), "option B is empty"),
    Case('more choices than letters',   'data',   lambda: _load(choices=[f'c{i}' for i in range(27)]),
         "more than the 26 option letters"),
    Case('answer out of range',         'data',   lambda: _load(answer=3),                   "out of range for 3 choices"),
    Case('answer letter not a choice',  'data',   lambda: _load(answer='D'),                 "'D' is out of range"),
    Case('missing answer',              'data',   lambda: _load(answer=None),                "field 'answer': missing"),
    Case('empty question',              'data',   lambda: _load(question='  '),              "field 'question': empty"),
    Case('non-UTF-8 question',          'data',   lambda: _load(question=b'caf\xe9?'),       "not valid UTF-8"),
    Case('right-to-left text',          'data',   _rtl,                                       "reads back as option B"),
    Case('50,000-character question',   'prompt', _long_question,
         "more than the model's 1024-token context; prompts are never cut"),
    Case('dataset without the columns', 'data',   _no_columns,                                "image (column 'image')"),
    Case('unknown method',              'run',    lambda: STLConfig(method='stl-plus'),           "unknown method 'stl-plus'"),
    Case('unknown model',               'run',    lambda: check_run(STLConfig(model='not a model')),
         "not 'embedded', an existing folder or a hub id"),
    Case('unknown data',                'run',    lambda: check_run(STLConfig(data='m4cot')), "unknown data 'm4cot'"),
    Case('rounds < 0',                  'run',    lambda: STLConfig(rounds=-1),              "rounds must be 0 or more"),
    Case('rounds = 0',                  'run',    _rounds_zero,                               "runs round 0 only"),
    Case("folder holds another run",    'run',    _other_run,
         "holds a run of another config (method: 'stl' -> 'star')"),
    Case('read-only output folder',     'disk',   _read_only,                                 "stl_run: error: cannot write"),
    Case('disk full during a run',      'disk',   _full_disk,                    "No space left on device; what was written is kept"),
    Case('model without chat template', 'model',  _no_template,                               "has no chat template"),
    Case('empty reply',                 'model output', lambda: _reply(''),                  "missing_caption"),
    Case('endless reply',               'model output', lambda: _reply('CAPTION: ' + 'a red ' * 40, finished=False),
         "degenerate_repetition"),
    Case('reply with no conclusion',    'model output', lambda: _reply('CAPTION: a red square.\n\nREASONING: it is red.'),
         "no_answer"),
]

def catalogue(cases=CASES) -> pd.DataFrame:
    "The table of `cases`, each run now: what it reaches, the kind of answer, and the message."
    rows = [dict(case=c.name, part=c.part, **outcome(c)) for c in cases]
    return pd.DataFrame(rows).set_index('case')
