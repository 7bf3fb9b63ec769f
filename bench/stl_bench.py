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

Every figure is printed as one table (ratio to its baseline, absolute numbers) with the machine, and written as JSON.

    python bench/stl_bench.py [--part gen round train quant] [--limit 64] [--out stl_bench.json] [--threads 1]
"""
import argparse, contextlib, json, os, pickle, platform, resource, subprocess, sys, tempfile, time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ('gen', 'round', 'train', 'quant')


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

def train_once(examples, group_by_length:bool, epochs:float, quant=None, work=None):
    "A `TrainResult` of LoRA on a fresh embedded model (4-bit base with `quant='4bit'`)."
    import stl_nb.loop  # noqa: F401 -- its import applies a temporary fix to stl_nb.train (a missing `import torch`)
    from stl_nb.models import load_vlm
    from stl_nb.train import embedded_train_config, train_qlora
    cfg = embedded_train_config(epochs=epochs, group_by_length=group_by_length, logging_steps=1000)
    with quiet(): return train_qlora(load_vlm('embedded', quant=quant), examples, cfg, tempfile.mkdtemp(dir=work), progress=False)

def part_train(a, examples, work) -> list:
    "Length-grouped vs random batches on the same examples, interleaved, best of `repeats` each."
    res = {False: [], True: []}
    for _ in range(a.repeats):
        for g in (False, True): res[g].append(train_once(examples, g, a.epochs, work=work))
    best = {g: max(rs, key=lambda r: r.tokens_per_s) for g, rs in res.items()}
    rows = []
    for g, what in ((False, 'random batches'), (True, 'length-grouped batches')):
        r = best[g]
        rows.append(row('train', f'{what}: tokens/s', r.tokens_per_s, 'tokens/s', None if not g else best[False].tokens_per_s,
                        padding=round(r.padding, 3), seconds=round(r.seconds, 2), examples=r.n_examples))
        rows.append(row('train', f'{what}: padding fraction', r.padding, 'fraction', None if not g else best[False].padding))
    from stl_nb.models import load_vlm
    from stl_nb.train import example_lengths, embedded_train_config, _padding
    lengths, _ = example_lengths(load_vlm('embedded'), examples)
    bs = embedded_train_config().batch_size
    pad_sorted = _padding(lengths, bs, sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    rows.append(row('train', 'fully sorted batches: padding fraction', pad_sorted, 'fraction', best[False].padding))
    # the most that removing padding can give (same compute per real token): this is the ceiling of any length grouping
    rows.append(row('train', 'ceiling of grouping: (1-pad_sorted)/(1-pad_random)', (1 - pad_sorted)/(1 - best[False].padding), 'ratio'))
    return rows


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
    if 'quant' in a.part: rows += part_quant(a, examples, work)
    m['seconds'] = round(time.perf_counter() - t0, 1); m.update(peak_memory())
    print(table(rows, m))
    print(f"whole benchmark: {m['seconds']} s, peak RSS {m['rss_mb']} MB" + (f", peak CUDA {m['cuda_mb']} MB" if 'cuda_mb' in m else ''))
    Path(a.out).write_text(json.dumps(dict(machine=m, args=vars(a), rows=rows), indent=1))
    return dict(machine=m, rows=rows)


if __name__ == '__main__': main()
