#!/usr/bin/env python
"""stl_bench: where the time of an STL round goes and what each speed-up buys, measured side by side in one run.

  gen     generation: batched vs one question per call, and negatives from a shared prefix vs independent prompts
          (the functions of bench/bench_generate.py, on the embedded model)
  round   one embedded `run_stl` round (rounds=1) split into load / generate / filter / negatives / train / evaluate /
          report seconds, by timing the library's own functions while `run_stl` runs
  train   training tokens/s and padding fraction: length-grouped batches (`TrainConfig.group_by_length`) vs random
          batches, on that round's own examples (rationales and negatives, whose lengths differ)
  quant   4-bit (NF4, bitsandbytes) vs full-precision LoRA training of the embedded model: step time and peak memory,
          each in its own process so that peak RSS is its own
  spread  the train part's comparison where lengths spread, as with Qwen2.5-VL at real scale: a tiny Qwen2.5-VL-class
          model (`Qwen2_5_VLForConditionalGeneration`, random weights, every size shrunk: `stl_nb.models.tiny_model`)
          with the real Qwen2.5-VL processor (../shared/fixtures/qwen2.5-vl-7b-instruct, or $STL_FIXTURES), loaded by
          `load_vlm`, trained on the STL examples of real M3CoT test questions (../shared/fixtures/m3cot-sample, read at
          run time; `--spread-questions` of them, spread over its four domains). Assumed, not measured: M3CoT's images are
          not in the fixture, so each question gets a one-colour placeholder image whose size is drawn with a fixed seed so
          that Qwen2.5-VL's dynamic resolution gives it 64 to 256 image tokens (the range `load_vlm` caps Qwen to,
          224²..448² pixels); the targets are a round's two kinds, a positive rationale (CAPTION 20-60 words,
          REASONING 30-120 words, CONCLUSION) per question and a negative (CAPTION 20-60, EXPLANATION 20-60 words) per
          wrong option, whose words are drawn with a fixed seed from the question, its options and a small vocabulary:
          placeholder prose of assumed lengths, made into examples by the library's `positive_examples` and
          `negative_examples`. Skipped, with one line saying why, when a fixture folder is absent

Every figure is printed as one table (ratio to its baseline, absolute numbers) with the machine, and written as JSON.

    python bench/stl_bench.py [--part gen round train quant spread] [--limit 64] [--out stl_bench.json] [--threads 1]
"""
import argparse, contextlib, json, math, os, pickle, platform, random, resource, subprocess, sys, tempfile, time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ('gen', 'round', 'train', 'quant', 'spread')
FIXTURES = Path(os.environ.get('STL_FIXTURES', HERE.parent.parent/'shared'/'fixtures'))   # as tests/conftest.py finds them


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--part', nargs='+', choices=PARTS, default=list(PARTS))
    p.add_argument('--limit', type=int, default=64, help='training questions of the measured round')
    p.add_argument('--test-limit', type=int, default=32, help='test questions of the measured round')
    p.add_argument('--n', type=int, default=32, help='questions of the generation comparisons')
    p.add_argument('--max-new-tokens', type=int, default=160, help='generation comparisons')
    p.add_argument('--batch-size', type=int, default=32, help='generation comparisons: rows per generate call')
    p.add_argument('--repeats', type=int, default=2, help='timed runs of each method (best taken)')
    p.add_argument('--epochs', type=float, default=2, help='passes over the round examples in the train and quant parts')
    p.add_argument('--spread-questions', type=int, default=8, help='spread part: M3CoT questions whose examples are trained on')
    p.add_argument('--spread-epochs', type=float, default=1, help='spread part: passes over those examples')
    p.add_argument('--fixtures', default=str(FIXTURES), help='spread part: folder holding qwen2.5-vl-7b-instruct and m3cot-sample')
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: steadier timings on a shared machine)')
    p.add_argument('--out', default='stl_bench.json')
    return p.parse_args(argv)


# ---------------------------------------------------------------- machine and memory

def machine() -> dict:
    import torch, transformers
    m = dict(machine=platform.machine(), cpus=os.cpu_count(), threads=torch.get_num_threads(),
             load=' '.join(f'{x:.1f}' for x in os.getloadavg()), python=platform.python_version(),
             torch=torch.__version__, transformers=transformers.__version__,
             date=time.strftime('%Y-%m-%d %H:%M %Z'))
    if torch.cuda.is_available(): m['gpu'] = torch.cuda.get_device_name()
    return m

def peak_memory() -> dict:
    "Peak memory so far: the process's resident set (Linux: KiB), and the GPU's allocations when there is one."
    import torch
    d = {'rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, 1)}
    if torch.cuda.is_available(): d['cuda_mb'] = round(torch.cuda.max_memory_allocated()/2**20, 1)
    return d


def quiet():
    "Swallow what the Trainer prints (its loss dicts) so that only the table is shown."
    import io
    return contextlib.redirect_stdout(io.StringIO())


# ---------------------------------------------------------------- rows

def row(part, what, value, unit, base=None, **extra) -> dict:
    "One line of the table: `value` in `unit`, and its ratio to `base` (the baseline's value) where there is one."
    return dict(part=part, what=what, value=round(value, 4), unit=unit, ratio=None if base is None else round(value/base, 2), **extra)

def table(rows, m) -> str:
    head = (f"stl_bench {m['date']}: {m.get('gpu', m['machine'])}, {m['cpus']} CPUs ({m['threads']} torch threads, load {m['load']}), "
            f"python {m['python']}, torch {m['torch']}, transformers {m['transformers']}")
    lines = [head, f"{'part':<7} {'what':<44} {'value':>10} {'unit':<12} {'ratio':>6}  {'by CPU':>6}  identical"]
    for r in rows:
        cpu, same = r.get('cpu_ratio'), r.get('identical')
        lines.append(f"{r['part']:<7} {r['what']:<44} {r['value']:>10.3f} {r['unit']:<12} "
                     f"{'' if r['ratio'] is None else format(r['ratio'], '.2f') + 'x':>6}  "
                     f"{'' if cpu is None else format(cpu, '.2f') + 'x':>6}  {'' if same is None else f'{same}/' + str(r.get('replies'))}")
    return '\n'.join(lines)


# ---------------------------------------------------------------- gen

def part_gen(a) -> list:
    "bench_generate's two comparisons, as rows: replies/s of each method and its ratio to the baseline."
    sys.path.insert(0, str(HERE))
    import bench_generate as bg
    from stl_nb.models import load_vlm
    from stl_nb.world import make_world
    from stl_nb.generate import GenConfig
    vlm, cfg = load_vlm('embedded'), GenConfig(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    four = [s for s in make_world(4*a.n, seed=0) if len(s.choices) == 4][:a.n//2]
    out = []
    for rs in (bg.bench_batch(vlm, make_world(a.n, seed=0), cfg, a.repeats), bg.bench_negatives(vlm, four, cfg, a.repeats)):
        base = None
        for part, what, n, tokens, t, ratio, same in rs:   # t: (wall, CPU) seconds, as bench_generate's race measures them
            if 'prompt only' in what: continue
            wall, cpu = t
            out.append(row('gen', what, n/wall, 'replies/s', base, seconds=round(wall, 3), cpu_seconds=round(cpu, 3),
                           cpu_ratio=None if ratio is None else round(ratio[1], 2), replies=n, tokens=tokens, identical=same))
            base = base or n/wall
    return out


# ---------------------------------------------------------------- round

STEPS = {  # step of the round: the library functions (module, name) whose time it is, as run_stl calls them
    'load':      [('stl_nb.loop', 'load_model')],
    'generate':  [('stl_nb.negatives', 'generate')],          # generate_round's positives
    'filter':    [('stl_nb.negatives', 'keep_correct'), ('stl_nb.negatives', 'audit_negatives')],
    'negatives': [('stl_nb.negatives', 'make_negatives')],
    'train':     [('stl_nb.loop', 'train_qlora')],
    'evaluate':  [('stl_nb.loop', 'generate'), ('stl_nb.loop', 'score')],   # the test split's answers, scored
    'report':    [('stl_nb.loop', 'write_report')],
}

@contextlib.contextmanager
def timed_steps(seconds:dict, calls:dict):
    "Patch each function of `STEPS` to add its time to `seconds[step]` (and keep its arguments in `calls`), restoring them after."
    import importlib
    saved = []
    def wrap(step, name, f):
        def g(*args, **kw):
            t0 = time.perf_counter()
            try: return f(*args, **kw)
            finally:
                seconds[step] = seconds.get(step, 0.) + time.perf_counter() - t0
                calls.setdefault(name, []).append(args)
        return g
    try:
        for step, fs in STEPS.items():
            for mod, name in fs:
                m = importlib.import_module(mod)
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, wrap(step, name, getattr(m, name)))
        yield seconds
    finally:
        for m, name, f in reversed(saved): setattr(m, name, f)

def part_round(a, work:Path) -> tuple:
    "Rows of one timed embedded round, and the examples it trained on (for the train and quant parts)."
    from stl_nb.loop import run_stl, tiny_config
    cfg = tiny_config(limit=a.limit, test_limit=a.test_limit, rounds=1, out=str(work/'round'))
    seconds, calls = {}, {}
    t0 = time.perf_counter()
    with timed_steps(seconds, calls), quiet(): m = run_stl(cfg, overwrite=True, progress=False)
    total = time.perf_counter() - t0
    examples = calls['train_qlora'][0][1] if calls.get('train_qlora') else []
    rows = [row('round', f'{k} (2 evaluations)' if k == 'evaluate' else k, v, 's', total) for k, v in seconds.items()]
    rows.append(row('round', 'other (folders, metrics)', total - sum(seconds.values()), 's', total))
    rows.append(row('round', f'round 0 + round 1 ({a.limit} train / {a.test_limit} test questions)', total, 's',
                    n_examples=len(examples), accuracy=[r['accuracy'] for r in m['rounds']]))
    return rows, examples


# ---------------------------------------------------------------- train

def train_once(examples, group_by_length:bool, epochs:float, quant=None, work=None, model='embedded', preset=None):
    "A `TrainResult` of LoRA on a fresh `model` (4-bit base with `quant='4bit'`), with `preset` (default: the embedded one)."
    from stl_nb.models import load_vlm
    from stl_nb.train import embedded_train_config, train_qlora
    cfg = (preset or embedded_train_config)(epochs=epochs, group_by_length=group_by_length, logging_steps=1000)
    with quiet(): return train_qlora(load_vlm(model, quant=quant), examples, cfg, tempfile.mkdtemp(dir=work), progress=False)

def padding_of(lengths, bs, order) -> float:
    "Fraction of padded positions when examples of `lengths` are batched `bs` at a time in `order`."
    batches = [[lengths[i] for i in order[k:k + bs]] for k in range(0, len(order), bs)]
    total = sum(max(b)*len(b) for b in batches if b)
    return 1 - sum(lengths)/total if total else 0.0

def compare_batches(part, examples, train, vlm, batch_size:int, repeats:int) -> list:
    "Rows of `train(examples, group_by_length)` with random vs length-grouped batches, interleaved, best of `repeats` each; then the padding of fully sorted batches (`vlm` measures the lengths) and the ceiling it sets."
    res = {False: [], True: []}
    for _ in range(repeats):
        for g in (False, True): res[g].append(train(examples, g))
    best = {g: max(rs, key=lambda r: r.tokens_per_s) for g, rs in res.items()}
    rows = []
    for g, what in ((False, 'random batches'), (True, 'length-grouped batches')):
        r = best[g]
        rows.append(row(part, f'{what}: tokens/s', r.tokens_per_s, 'tokens/s', None if not g else best[False].tokens_per_s,
                        padding=round(r.padding, 3), seconds=round(r.seconds, 2), examples=r.n_examples))
        rows.append(row(part, f'{what}: padding fraction', r.padding, 'fraction', None if not g else best[False].padding))
    from stl_nb.train import example_lengths
    lengths, _ = example_lengths(vlm, examples)
    pad_sorted = padding_of(lengths, batch_size, sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    rows.append(row(part, 'fully sorted batches: padding fraction', pad_sorted, 'fraction', best[False].padding))
    # the most that removing padding can give (same compute per real token): this is the ceiling of any length grouping
    rows.append(row(part, 'ceiling of grouping: (1-pad_sorted)/(1-pad_random)', (1 - pad_sorted)/(1 - best[False].padding), 'ratio'))
    return rows

def part_train(a, examples, work) -> list:
    "Length-grouped vs random batches on the round's examples, interleaved, best of `repeats` each."
    from stl_nb.models import load_vlm
    from stl_nb.train import embedded_train_config
    return compare_batches('train', examples, lambda ex, g: train_once(ex, g, a.epochs, work=work), load_vlm('embedded'),
                           embedded_train_config().batch_size, a.repeats)


# ---------------------------------------------------------------- quant

def quant_child(path:str, quant:str, epochs:float):
    "Run in a child process: train once with `quant`, print the result and this process's peak memory as JSON."
    examples = pickle.loads(Path(path).read_bytes())
    import torch
    torch.set_num_threads(int(os.environ.get('STL_BENCH_THREADS', '1')))
    from stl_nb.models import load_vlm
    r = train_once(examples, True, epochs, quant=None if quant == 'none' else quant, work=Path(path).parent)
    vlm = load_vlm('embedded', quant=None if quant == 'none' else quant)
    weights = sum(p.numel()*p.element_size() for p in vlm.model.parameters())
    print('RESULT ' + json.dumps(dict(seconds=r.seconds, tokens_per_s=r.tokens_per_s, steps=len(r.losses) or None,
                                      weights_mb=round(weights/2**20, 3), **peak_memory())))

def part_quant(a, examples, work) -> list:
    "Full precision vs 4-bit, each in its own process (a process's peak RSS is only its own)."
    p = work/'examples.pkl'; p.write_bytes(pickle.dumps(examples))
    res = {}
    for q in ('none', '4bit'):
        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import stl_bench; stl_bench.quant_child({str(p)!r}, {q!r}, {a.epochs})"
        env = {**os.environ, 'STL_BENCH_THREADS': str(a.threads), 'OMP_NUM_THREADS': str(a.threads)}
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
        line = next((l for l in out.stdout.splitlines() if l.startswith('RESULT ')), None)
        if line is None: raise RuntimeError(f"quant={q} child failed:\n{out.stderr[-2000:]}")
        res[q] = json.loads(line[7:])
    f, q = res['none'], res['4bit']
    return [row('quant', 'full precision: tokens/s', f['tokens_per_s'], 'tokens/s'),
            row('quant', '4-bit NF4: tokens/s', q['tokens_per_s'], 'tokens/s', f['tokens_per_s']),
            row('quant', 'full precision: weights', f['weights_mb'], 'MB'),
            row('quant', '4-bit NF4: weights', q['weights_mb'], 'MB', f['weights_mb']),
            row('quant', 'full precision: peak RSS of its process', f['rss_mb'], 'MB'),
            row('quant', '4-bit NF4: peak RSS of its process', q['rss_mb'], 'MB', f['rss_mb'])]


# ---------------------------------------------------------------- spread

def spread_train_config(**kw):
    "The embedded preset (rank 16, no accumulation, no checkpointing) at batch 2, the same for random and grouped batches."
    from stl_nb.train import embedded_train_config
    return embedded_train_config(**{
        'batch_size': 2,   # a token's logits over Qwen's 152k-token vocabulary are 0.6 MB, x3 with softmax and gradient: batch 2 of
                           # ~600 tokens peaks at ~3 GB (batch 4: ~5 GB); time goes with padded tokens (~330/s on one core), so
                           # 8 questions' 27 examples fit the default run, and n // (4*batch) still puts 3 batches in a mega-batch
        **kw})

def placeholder_image(rng):
    "A blank image whose size Qwen2.5-VL (capped to 224²..448² pixels) turns into 64 to 256 image tokens: area and aspect ratio (1:2 to 2:1) drawn from `rng`."
    from PIL import Image
    tokens, aspect = rng.randint(64, 256), math.exp(rng.uniform(-math.log(2), math.log(2)))
    h = max(1, round(math.sqrt(tokens/aspect))); w = max(1, round(tokens/h))   # in 28-pixel cells (2x2 patches of 14)
    return Image.new('RGB', (28*w, 28*h), tuple(rng.randrange(256) for _ in range(3)))

def prose(rng, words:list, lo:int, hi:int) -> str:
    "Placeholder prose of `lo` to `hi` words drawn from `words`, in sentences of 6 to 16 words."
    n, out = rng.randint(lo, hi), []
    while n > 0:
        k = min(n, rng.randint(6, 16)); n -= k
        s = [rng.choice(words) for _ in range(k)]
        out.append(' '.join([s[0].capitalize()] + s[1:]) + '.')
    return ' '.join(out)

COMMON = ('the image shows a there is which means that because of this so it is not and in on with from its this option '
          'answer question picture object left right top bottom color shape large small near far people scene '
          'therefore however also likely clearly visible appears suggests between each one two three').split()

def spread_samples(folder:Path, seed:int=0):
    "The M3CoT questions of `folder`/test_sample.jsonl as `Samples` (the library's loader), each with its placeholder image."
    from stl_nb.data import samples_from_records
    records = [json.loads(l) for l in (folder/'test_sample.jsonl').read_text(encoding='utf-8').splitlines() if l.strip()]
    rng = random.Random(seed)
    return samples_from_records([{**r, 'image': placeholder_image(rng)} for r in records], source='m3cot-sample', answer_as='letter')

def spread_examples(samples, seed:int=0) -> list:
    "A round's training examples of `samples`: a positive rationale per question and a negative per wrong option, through `positive_examples` and `negative_examples` from records of placeholder prose."
    from stl_nb.data import letter
    from stl_nb.keep import positive_examples
    from stl_nb.negatives import negative_examples
    from stl_nb.templates import render_rationale, render_negative
    from stl_nb.train import Example
    pos, neg = [], []
    for s in samples:
        rng = random.Random(f'{seed}:{s.id}')   # a question's prose does not depend on which others are picked
        words = [w.strip('.,?!:;()"').lower() for w in ' '.join([s.question, *s.choices]).split()] + list(COMMON)
        words = [w for w in words if w]
        caption = lambda: prose(rng, words, 20, 60)
        pos.append(dict(id=s.id, kind='positive', wrong=None, k=0,
                        raw=render_rationale((caption(), prose(rng, words, 30, 120), s.answer), s.choices)))
        neg += [dict(id=s.id, kind='negative', wrong=letter(i), k=0, raw=render_negative(caption(), prose(rng, words, 20, 60)))
                for i in range(len(s.choices)) if i != s.answer]
    return [Example(*e, kind='positive', source_id=r['id']) for r, e in zip(pos, positive_examples(pos, samples))] + \
           [Example(*e, kind='negative', source_id=r['id']) for r, e in zip(neg, negative_examples(neg, samples))]

def part_spread(a, work:Path) -> list:
    "Length-grouped vs random batches where lengths spread: the tiny Qwen2.5-VL on M3CoT questions' STL examples (see the module's docstring)."
    src, m3 = Path(a.fixtures)/'qwen2.5-vl-7b-instruct', Path(a.fixtures)/'m3cot-sample'
    if missing := [str(p) for p in (src, m3) if not p.is_dir()]:
        print(f"spread: skipped, no fixture folder {' or '.join(missing)} (set --fixtures or STL_FIXTURES to shared/fixtures)", flush=True)
        return []
    from stl_nb.models import load_vlm, tiny_model
    folder = tiny_model(src, work/'tiny-qwen2.5-vl')   # the real class, random weights, every size shrunk
    vlm = load_vlm(str(folder))
    samples = spread_samples(m3)
    picked = sorted(random.Random(0).sample(range(len(samples)), min(a.spread_questions, len(samples))))  # all four domains
    samples = [samples[i] for i in picked]
    examples = spread_examples(samples)
    n_image = [int((vlm.encode([s.image], [[{'role': 'user', 'content': [{'type': 'image'}]}]])['input_ids'] == vlm.image_token_id).sum())
               for s in samples]
    from stl_nb.train import example_lengths
    lengths, _ = example_lengths(vlm, examples)
    kinds = {k: sum(e.kind == k for e in examples) for k in ('positive', 'negative')}
    rows = [row('spread', f"image tokens, assumed sizes: mean ({min(n_image)} to {max(n_image)})", sum(n_image)/len(n_image), 'tokens',
                questions=len(samples), image_tokens=n_image),
            row('spread', f"example tokens: mean ({min(lengths)} to {max(lengths)})", sum(lengths)/len(lengths), 'tokens',
                lengths=lengths, **kinds),
            row('spread', f"examples: {len(samples)} M3CoT questions' positives + negatives", len(examples), 'examples', **kinds)]
    train = lambda ex, g: train_once(ex, g, a.spread_epochs, work=work, model=str(folder), preset=spread_train_config)
    return rows + compare_batches('spread', examples, train, vlm, spread_train_config().batch_size, a.repeats)


# ---------------------------------------------------------------- main

def main(argv=None):
    a = parse_args(argv)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false'); os.environ.setdefault('TQDM_DISABLE', '1')
    import warnings; warnings.filterwarnings('ignore')
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar(); hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    m, rows, examples, t0 = machine(), [], None, time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix='stl-bench-'))
    if 'gen' in a.part: rows += part_gen(a); print(table(rows, m), flush=True)
    if {'round', 'train', 'quant'} & set(a.part):
        r, examples = part_round(a, work)
        if 'round' in a.part: rows += r
    if 'train' in a.part: rows += part_train(a, examples, work)
    if 'spread' in a.part: rows += part_spread(a, work)
    if 'quant' in a.part: rows += part_quant(a, examples, work)
    m['seconds'] = round(time.perf_counter() - t0, 1); m.update(peak_memory())
    print(table(rows, m))
    print(f"whole benchmark: {m['seconds']} s, peak RSS {m['rss_mb']} MB" + (f", peak CUDA {m['cuda_mb']} MB" if 'cuda_mb' in m else ''))
    Path(a.out).write_text(json.dumps(dict(machine=m, args=vars(a), rows=rows), indent=1))
    return dict(machine=m, rows=rows)


if __name__ == '__main__': main()
