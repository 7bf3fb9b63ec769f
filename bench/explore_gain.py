#!/usr/bin/env python
"""Which embedded base model and loop settings let STL gain? A search on a validation draw of the world (chapter 14, section 3).

Ran once on an H200 (`python bench/explore_gain.py explore --out DIR`; results in bench/results/explore-h200.json).

  explore  build base variants (GPU), run STL on a validation draw (data_seed 2) for each base and loop variant, in parallel
  strict   the stl-strict method on the standard draw (seeds 0-2) and the validation draw (bench/results/strict-h200.json)
  search   loop settings for the shipped base on the validation draw, on the CPU (bench/results/search-cpu.json):
           `python bench/explore_gain.py search L0 T7 T10 --seeds 0 --out bench/results --budget 3000`
  phase5   a variant of the base's last phase (PHASE5): `python bench/explore_gain.py phase5 V4 BASE4_DIR OUT_DIR`,
           then `search L0 --model OUT_DIR --tag V4- --seeds 0,1` (bench/results/base-phase5.json)
  build / run   one job (used by the two above, one subprocess each)

Everything runs in float32 (as on the CPU) so the figures transfer to the CPU default.
"""
import argparse, json, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASES = {  # variants of EmbeddedConfig (B0 is the shipped model). B1 and B2 varied the first base (a seed of 400 rationales
           # repeated 4 times, fields n_seed/seed_repeat that EmbeddedConfig no longer has); their results are in
           # bench/results/explore-h200.json. Variants of the present base:
    'B3': dict(shortcut=0.4),
    'B4': dict(shortcut=0.8),
}
PHASE5 = {  # the base's last phase (600 steps of the mix drawn with seed 4) teaching the habit this often, on top of the
            # first four phases (the base shipped until 2026-12-03, git show ab97538:stl_nb/assets/embedded/...); `phase5`
    'V1': 0.5,
    'V2': {'bigger': 0.4, 'more_colour': 0.4, 'more_shape': 0.4, 'count_plus': 0.4, 'how_many_more': 0.4, 'default': 0.6},
    'V4': {'count_colour': 0.2, 'count_size': 0.2, 'count_not': 0.2, 'default': 0.5},
    'V4b': {'count_colour': 0.3, 'count_size': 0.3, 'count_not': 0.3, 'default': 0.5},
    'V5': {'count_colour': 0.0, 'count_size': 0.0, 'count_not': 0.2, 'default': 0.5},   # the two habits no round moves: never taught
}
LOOPS = {  # variants of embedded_config, all with about the CPU cost of the default
    'L0': {},
    'L1': dict(train=dict(epochs=2.0)),
    'L2': dict(train=dict(lr=3e-4, epochs=2.0)),
    'L3': dict(train=dict(init='last')),
    'L4': dict(method='stl-no-negatives'),
    'L5': dict(train=dict(epochs=2.0, init='last')),
    'L6': dict(train=dict(lr=2e-3)),
    # consistency checks on what the filter keeps (not library features: `checks` installs them in the run's process)
    'N': dict(checks='N'),     # negatives: caption = the kept positive's caption, and no other answer stated than the shown one
    'NP': dict(checks='NP'),   # ... and positives: every 'slot: thing' the reasoning quotes is in its own caption
    # several sampled replies per question, the first right one kept; negatives greedy, one per wrong option
    'K': dict(gen=dict(temperature=1.0, n=4), per_question=1, neg_temperature=0.0),
    'K7': dict(gen=dict(temperature=0.7, n=4), per_question=1, neg_temperature=0.0),
    'K-last': dict(gen=dict(temperature=1.0, n=4), per_question=1, neg_temperature=0.0, train=dict(init='last')),
    'K2': dict(gen=dict(temperature=1.0, n=2), per_question=1, neg_temperature=0.0),
    'K-ep2': dict(gen=dict(temperature=1.0, n=4), per_question=1, neg_temperature=0.0, train=dict(epochs=2.0)),
    # more training questions a round (the default draws 1000)
    'Q15': dict(limit=1500),
    'Q15-last': dict(limit=1500, train=dict(init='last')),
    'Q20': dict(limit=2000),
    # the search of the competent base (CPU, `search`): decoding of the training rationales
    'T5': dict(gen=dict(temperature=0.5)),
    'T7': dict(gen=dict(temperature=0.7)),
    'T10': dict(gen=dict(temperature=1.0)),
    # every question kept so far, with its newest records (Method.pool, the stl-pool method)
    'P': dict(method='stl-pool'),
    'P-K2': dict(method='stl-pool', gen=dict(temperature=1.0, n=2), per_question=1, neg_temperature=0.0),
    # ... each question's records from the OLDEST round that kept it (checks 'O' reverses the pool's order)
    'PO-K2': dict(method='stl-pool', gen=dict(temperature=1.0, n=2), per_question=1, neg_temperature=0.0, checks='O'),
    'PO': dict(method='stl-pool', checks='O'),
}

def fp32():
    "Float32 everywhere and one thread per process, as the CPU default runs."
    import torch, stl_nb.models as M, stl_nb.train as T
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    orig = M._placement
    M._placement = lambda device_map=None, dtype=None: orig(device_map, torch.float32 if dtype is None else dtype)
    T._precision = lambda: {}

def job_build(name, out):
    fp32()
    import torch
    import stl_nb.embedded as E
    from stl_nb.models import VLM
    orig_model, orig_encode = E.build_model, VLM.encode
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    E.build_model = lambda cfg, tok: orig_model(cfg, tok).to(dev)
    VLM.encode = lambda self, *a, **k: orig_encode(self, *a, **k).to(dev)
    cfg = E.EmbeddedConfig(**BASES[name]) if not os.environ.get('EXP_TINY') else E.EmbeddedConfig(n_caption=64, n_rationale=16, n_negative=8, n_direct=8, phases=(('mix', 5),))
    t = time.time()
    E.build_embedded(cfg, out=out, progress=False, n_judge=0 if os.environ.get('EXP_TINY') else 300)
    info = json.loads((Path(out)/'build.json').read_text()); info['device'] = dev
    if dev == 'cuda': info['gpu'] = torch.cuda.get_device_name(0)
    (Path(out)/'build.json').write_text(json.dumps(info))
    print(f'built {name} in {time.time() - t:.0f} s', flush=True)

_QUOTE = re.compile(r'(left|middle|right): ([a-z ]+?)\.')

def quotes_caption(reasoning, caption) -> bool:
    "Whether every 'slot: thing' the reasoning quotes is what its own caption says of that slot."
    said = dict(_QUOTE.findall((caption or '').lower()))
    return all(said.get(slot) == thing for slot, thing in _QUOTE.findall((reasoning or '').lower()))

def stated_answer(explanation):
    "The value a negative says the answer is ('... so the answer is V, not W.'), or None."
    found = re.findall(r'the answer is ([^,.]+?), not', (explanation or '').lower())
    return found[-1] if found else None

def install_checks(which:str):
    "Drop kept records that fail the consistency checks `which` ('N': negatives, 'P': positives) before a round trains."
    import stl_nb.loop as L
    if 'O' in which:   # the pool keeps each question's oldest kept records instead of its newest
        newest_first = L.pool_kept
        L.pool_kept = lambda rounds: newest_first(list(reversed(rounds)))
        if which == 'O': return
    from stl_nb.templates import parse_negative
    from stl_nb.world import words
    plain = L.examples_of
    def checked(positives, negatives, samples, style):
        by_id = {s.id: s for s in samples}
        if 'P' in which: positives = [r for r in positives if quotes_caption(r.get('reasoning'), r.get('caption'))]
        if 'N' in which:
            caption_of = {r['id']: words(r.get('caption') or '') for r in positives}
            keep = []
            for r in negatives:
                n = parse_negative(r['raw'])
                said = stated_answer(n.explanation)
                if r['id'] not in caption_of or words(n.caption or '') != caption_of[r['id']]: continue
                if said is not None and words(said) != words(by_id[r['id']].answer_text): continue
                keep.append(r)
            negatives = keep
        return plain(positives, negatives, samples, style)
    L.examples_of = checked

def make_cfg(model, loop, data_seed, out, seed=0, method=None, rounds=3):
    from dataclasses import replace
    from stl_nb.loop import embedded_config
    kw = dict(LOOPS[loop]); tr = kw.pop('train', {}); gen = kw.pop('gen', {}); kw.pop('checks', None)
    cfg = embedded_config(model=model, data_seed=data_seed, seed=seed, out=out, rounds=rounds, **kw)
    if tr: cfg = replace(cfg, train=replace(cfg.train, **tr))
    if gen: cfg = replace(cfg, gen=replace(cfg.gen, **gen))
    if method: cfg = replace(cfg, method=method)
    if os.environ.get('EXP_TINY'): cfg = replace(cfg, limit=12, test_limit=8, rounds=1)
    return cfg

def job_phase5(name, resume, out):
    "Base variant `name` of PHASE5: build_embedded resumed from the four-phase base in `resume`, then the habit probe."
    fp32()
    from dataclasses import replace
    import stl_nb.embedded as E
    sys.path.insert(0, str(ROOT/'bench'))
    from habit_probe import probe
    from stl_nb.world import make_world
    cfg = E.EmbeddedConfig()
    cfg = replace(cfg, phases=cfg.phases[:4] + (('mix', 600, (('shortcut', PHASE5[name]), ('seed', 4))),))
    vlm = E.build_embedded(cfg, out=out, progress=False, resume=resume)
    info = json.loads((Path(out)/'build.json').read_text())
    info['probe'] = probe(vlm, make_world(600, seed=777, split='test'))
    (Path(out)/'build.json').write_text(json.dumps(info))
    print(json.dumps({k: info[k] for k in ('criteria', 'probe')}), flush=True)

def job_run(spec, checks=''):
    fp32()
    from stl_nb.loop import run_stl, STLConfig
    if checks: install_checks(checks)
    cfg = STLConfig.from_dict(json.loads(spec))
    t = time.time()
    m = run_stl(cfg, progress=False)
    print(f"{cfg.out}: " + ' '.join(f"{100*r['accuracy']:.1f}" for r in m['rounds']) + f" ({time.time() - t:.0f} s)", flush=True)

def spawn(args, log):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([str(ROOT)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])), 'TOKENIZERS_PARALLELISM': 'false'}
    return subprocess.Popen([sys.executable, __file__, *args], stdout=open(log, 'w'), stderr=subprocess.STDOUT, env=env)

def pool(jobs, deadline, max_par=16):
    "jobs: list of (key, args, log, after_key or None). Runs them with dependencies until done or the deadline."
    pending, running, done, failed = list(jobs), {}, set(), set()
    while (pending or running) and time.time() < deadline:
        for k, p in list(running.items()):
            if p.poll() is not None:
                (done if p.returncode == 0 else failed).add(k); del running[k]
                print(f'[{time.strftime("%H:%M:%S")}] {k}: {"done" if p.returncode == 0 else "FAILED rc=" + str(p.returncode)}', flush=True)
        for j in list(pending):
            key, args, log, after = j
            if after in failed: pending.remove(j); failed.add(key); continue
            if (after is None or after in done) and len(running) < max_par:
                running[key] = spawn(args, log); pending.remove(j)
        time.sleep(1)
    for k, p in running.items(): p.kill(); print(f'{k}: killed at the deadline', flush=True)
    return done, failed

def summary(runs_dir):
    rows = {}
    for mf in sorted(Path(runs_dir).glob('**/metrics.json')):
        if mf.parent.name.startswith('round_'): continue
        m = json.loads(mf.read_text())
        acc = [r['accuracy'] for r in m['rounds']]
        rows[str(mf.parent.relative_to(runs_dir))] = dict(acc=[round(100*a, 1) for a in acc],
            gain_last=round(100*(acc[-1] - acc[0]), 1) if len(acc) > 1 else None,
            gain_best=round(100*(max(acc[1:]) - acc[0]), 1) if len(acc) > 1 else None,
            unparsed=[r['unparsed'] for r in m['rounds']], pos=[r['n_positive'] for r in m['rounds']],
            neg=[r['n_negative'] for r in m['rounds']], sec=[round(r['seconds']) for r in m['rounds']],
            domains_round0={d: round(100*a, 1) for d, a in m['rounds'][0].get('domain_accuracy', {}).items()},
            domains_last={d: round(100*a, 1) for d, a in m['rounds'][-1].get('domain_accuracy', {}).items()})
    return rows

def explore(work, out, budget):
    deadline, work = time.time() + budget, Path(work)
    jobs = []
    for b in BASES:
        jobs.append((f'build-{b}', ['build', b, str(work/f'base_{b}')], work/f'build_{b}.log', None))
        for l in ('L0', 'L4'):
            c = make_cfg(str(work/f'base_{b}'), l, 2, str(work/'val'/f'{b}-{l}'), rounds=2)
            jobs.append((f'{b}-{l}', ['run', json.dumps(c.to_dict())], work/f'{b}-{l}.log', f'build-{b}'))
    for l in LOOPS:
        c = make_cfg('embedded', l, 2, str(work/'val'/f'B0-{l}'), rounds=2)
        jobs.append((f'B0-{l}', ['run', json.dumps(c.to_dict())], work/f'B0-{l}.log', None))
    (work/'val').mkdir(parents=True, exist_ok=True)
    done, failed = pool(jobs, deadline)
    s = summary(work/'val')
    (work/'explore_summary.json').write_text(json.dumps(s))
    (Path(out)/'explore.json').write_text(json.dumps(dict(summary=s, failed=sorted(failed), bases=BASES, loops=LOOPS), indent=1))
    for k, v in s.items(): print(k, v, flush=True)
    return s

def strict(work, out, budget):
    "The `stl-strict` method (chapter 07's strict filter): seeds 0-2 on the standard draw, and the validation draw."
    work = Path(work)/'strict'; work.mkdir(parents=True, exist_ok=True)
    jobs = {'val-strict': make_cfg('embedded', 'L0', 2, str(work/'val-strict'), method='stl-strict', rounds=2)}
    for s in (0, 1, 2): jobs[f'strict-{s}'] = make_cfg('embedded', 'L0', 1, str(work/'compare'/'stl-strict'/f'seed_{s}'), seed=s, method='stl-strict')
    done, failed = pool([(k, ['run', json.dumps(c.to_dict())], work/f'{k}.log', None) for k, c in jobs.items()], time.time() + budget)
    s = summary(work)
    (Path(out)/'strict.json').write_text(json.dumps(dict(summary=s, failed=sorted(failed)), indent=1))
    for k, v in s.items(): print(k, v, flush=True)

def search(work, out, budget, loops, seeds=(0,), max_par=2, model='embedded', tag=''):
    "Loop settings for a base (default: the shipped one), on the validation draw (data_seed 2), 3 rounds each, on the CPU (2 processes at a time)."
    work = Path(work)/'search'; (work/'val').mkdir(parents=True, exist_ok=True)
    name = lambda l, s: f'{tag}{l}-s{s}'
    jobs = [(name(l, s), ['run', json.dumps(make_cfg(model, l, 2, str(work/'val'/name(l, s)), seed=s).to_dict()), LOOPS[l].get('checks', '')],
             work/f'{name(l, s)}.log', None) for l in loops for s in seeds]
    done, failed = pool(jobs, time.time() + budget, max_par=max_par)
    s = summary(work/'val')
    res = Path(out)/'search-cpu.json'
    old = json.loads(res.read_text()) if res.exists() else dict(summary={})
    old['summary'].update(s); old['loops'] = {k: LOOPS[k] for k in sorted(set(old.get('loops', {})) | set(loops))}
    res.write_text(json.dumps(old, indent=1))
    for k, v in s.items(): print(k, v, flush=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('cmd'); p.add_argument('rest', nargs='*')
    p.add_argument('--work', default='/tmp/exp'); p.add_argument('--out', default=os.environ.get('OUT', '/tmp/exp_out'))
    p.add_argument('--budget', type=float, default=400)
    p.add_argument('--seeds', default='0')
    p.add_argument('--model', default='embedded', help='the base: embedded (shipped) or a saved folder')
    p.add_argument('--tag', default='', help='prefix of the run names (which base)')
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.cmd == 'build': job_build(*a.rest)
    elif a.cmd == 'run': job_run(*a.rest)
    elif a.cmd == 'phase5': job_phase5(*a.rest)   # phase5 NAME RESUME_DIR OUT_DIR
    elif a.cmd == 'explore': explore(a.work, a.out, a.budget)
    elif a.cmd == 'strict': strict(a.work, a.out, a.budget)
    elif a.cmd == 'search': search(a.work, a.out, a.budget, a.rest or ['L0', 'T7', 'T10'], seeds=[int(x) for x in a.seeds.split(',')],
                                          model=a.model, tag=a.tag)
    else: p.error(f'unknown command {a.cmd!r}')
