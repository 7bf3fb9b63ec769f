#!/usr/bin/env python
"""Generation speed of stl_nb on the embedded model, each method measured side by side with its baseline in one process.

  batch           `generate_batch` over batches of questions  vs  one question per call (plain `model.generate` on one row)
  negatives       `generate_shared`: each question's image    vs  the same prompts generated independently (`generate_batch`),
                  and common prompt prefix encoded once           in the same batches
  negatives-llava the same comparison on a tiny random model of LLaVA-1.5's class and processor (576 image tokens per
                  prompt, as in the paper's setting; built from the shared fixtures' config, replies cut at --llava-tokens)

Both comparisons decode greedily and report the fraction of replies that are identical to the baseline's. The two methods
are timed batch by batch in turn (so a load that drifts hits both alike), each batch the best of `--repeats` runs (the
one-at-a-time baseline runs once: it is the slow one), and the batch times are summed, by the wall clock and by the
process's CPU time (which leaves out the time other processes held the cores, so it is the steadier of the two on a
shared machine). A busy machine slows all methods; pass `--threads 1` when another process is using the cores
(oversubscribed threads make every timing noisy).

    python bench/bench_generate.py [--part batch negatives negatives-llava] [--model embedded] [--n 128]
                                   [--batch-size 64] [--max-new-tokens 160] [--repeats 3] [--threads N]
"""
import argparse, os, platform, sys, tempfile, time
from dataclasses import replace
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--part', nargs='+', choices=('batch', 'negatives', 'negatives-llava'), default=['batch', 'negatives', 'negatives-llava'])
    p.add_argument('--model', default='embedded', help="'embedded' or a model folder")
    p.add_argument('--n', type=int, default=128, help='questions (batch); half as many with 4 options, 3 distractors each (negatives)')
    p.add_argument('--batch-size', type=int, default=64, help='rows per generate call')
    p.add_argument('--max-new-tokens', type=int, default=160)
    p.add_argument('--repeats', type=int, default=3, help='timed runs of each batched method (best taken)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch’s own choice)')
    p.add_argument('--seed', type=int, default=0, help='seed of the world questions')
    p.add_argument('--llava-fixture', default=str(Path(__file__).resolve().parents[2]/'shared'/'fixtures'/'llava-1.5-7b-hf'),
                   help='folder of the real LLaVA-1.5 processor and config (no weights), for negatives-llava')
    p.add_argument('--llava-tokens', type=int, default=64, help='max_new_tokens of negatives-llava (its random replies never stop)')
    return p.parse_args(argv)


def race(groups, baseline, method, repeats, baseline_repeats=None):
    """(baseline seconds, method seconds, baseline replies, method replies): batch by batch, each timed in turn, best of its repeats.
    Seconds are (wall, CPU) pairs: the process's CPU time leaves out the time other processes held the cores."""
    t = [[0., 0.], [0., 0.]]; out = [[], []]
    for g in groups:
        for i, (fn, n) in enumerate([(baseline, baseline_repeats or repeats), (method, repeats)]):
            ts = []
            for _ in range(n):
                t0, c0 = time.perf_counter(), time.process_time(); rs = fn(g); ts.append((time.perf_counter() - t0, time.process_time() - c0))
            t[i][0] += min(w for w, _ in ts); t[i][1] += min(c for _, c in ts); out[i] += rs
    return tuple(t[0]), tuple(t[1]), out[0], out[1]


def same(a, b) -> int: return sum(x == y for x, y in zip(a, b))

def ratio(base, new) -> tuple: return tuple(b / x for b, x in zip(base, new))


def bench_batch(vlm, samples, cfg, repeats):
    "Rows of the table: one question per call, then batched, on the positive prompt."
    from stl_nb.generate import Job, batches, reply_jobs
    jobs = [Job(s, 'positive') for s in samples]
    reply_jobs(vlm, jobs[:2], cfg)                                  # warm-up
    t_one, t_bat, one, bat = race(batches(jobs, cfg.batch_size), lambda g: [r for j in g for r in reply_jobs(vlm, [j], cfg)],
                                  lambda g: reply_jobs(vlm, g, cfg), repeats, baseline_repeats=1)
    n, tokens = len(jobs), sum(r.n_tokens for r in one)
    return [('batch', 'one question per call', n, tokens, t_one, None, None),
            ('batch', f'batched ({cfg.batch_size} per call)', n, tokens, t_bat, ratio(t_one, t_bat), same(one, bat))]


def bench_negatives(vlm, samples, cfg, repeats, part='negatives'):
    "Rows of the table: negatives generated independently, then from a shared prefix, in the same batches."
    from stl_nb.generate import batches, reply_jobs
    from stl_nb.negatives import negative_jobs
    from stl_nb.shared_prefix import reply_shared, shares_prefix
    if not shares_prefix(vlm): sys.exit(f"{vlm.name} ({vlm.kind}) does not share prefixes: nothing to compare")
    jobs = negative_jobs([dict(id=s.id, kind='positive') for s in samples], samples)
    reply_shared(vlm, jobs[:3], cfg); reply_jobs(vlm, jobs[:3], cfg)  # warm-up
    groups, k, rows = batches(jobs, cfg.batch_size), len(jobs) // len(samples), []
    for c, what in [(cfg, ''), (replace(cfg, max_new_tokens=1), ', prompt only')]:   # whole replies, then the prompt's encoding alone
        t_ind, t_sh, ind, sh = race(groups, lambda g: reply_jobs(vlm, g, c), lambda g: reply_shared(vlm, g, c), repeats)
        n, tokens = len(jobs), sum(r.n_tokens for r in ind)
        rows += [(part, f'independent prompts{what}', n, tokens, t_ind, None, None),
                 (part, f'shared prefix ({k} distr.){what}', n, tokens, t_sh, ratio(t_ind, t_sh), same(ind, sh))]
    return rows


def tiny_llava(fixture:Path):
    "A tiny random model of LLaVA-1.5's class with its real processor (576 image tokens), saved to a temporary folder and loaded."
    from stl_nb.models import load_vlm, tiny_model
    d = Path(tempfile.mkdtemp())/'tiny-llava-1.5'
    return load_vlm(tiny_model(fixture, d, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_key_value_heads=4, head_dim=32))


def table(rows) -> str:
    "The results: seconds and ratio by the wall clock, then by the process's CPU time (steadier on a shared machine)."
    head = (f"{'part':<10} {'method':<36} {'replies':>7} {'tokens':>7} {'seconds':>8} {'replies/s':>9} {'ratio':>7} "
            f"{'cpu s':>7} {'cpu ratio':>9}  identical")
    x = lambda r: '1.00x' if r is None else f'{r:.2f}x'
    fmt = lambda p, m, n, tok, t, r, s: (f"{p:<10} {m:<36} {n:>7} {tok:>7} {t[0]:>8.2f} {n/t[0]:>9.1f} {x(r and r[0]):>7} "
                                         f"{t[1]:>7.2f} {x(r and r[1]):>9}  {'(baseline)' if s is None else f'{s}/{n} ({100*s/n:.1f}%)'}")
    return '\n'.join([head] + [fmt(*r) for r in rows])


def main(argv=None):
    a = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    import torch, transformers
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar(); hf_logging.set_verbosity_error()
    if a.threads: torch.set_num_threads(a.threads)
    from stl_nb.models import load_vlm
    from stl_nb.world import make_world
    from stl_nb.generate import GenConfig
    vlm = load_vlm(a.model)
    cfg = GenConfig(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    n_params = sum(p.numel() for p in vlm.model.parameters())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"model: {vlm.name} ({vlm.kind}, {n_params/1e6:.1f}M parameters, {vlm.device}); greedy, max_new_tokens={cfg.max_new_tokens}, "
          f"batch_size={cfg.batch_size}, best of {a.repeats}\n")
    rows = []
    if 'batch' in a.part: rows += bench_batch(vlm, make_world(a.n, seed=a.seed), cfg, a.repeats)
    four = [s for s in make_world(4 * a.n, seed=a.seed) if len(s.choices) == 4][:a.n // 2]
    if 'negatives' in a.part: rows += bench_negatives(vlm, four, cfg, a.repeats)
    if 'negatives-llava' in a.part:
        if not Path(a.llava_fixture).exists(): print(f"negatives-llava skipped: {a.llava_fixture} is absent")
        else:
            ll = tiny_llava(Path(a.llava_fixture))
            print(f"negatives-llava: {ll.name}, {sum(p.numel() for p in ll.model.parameters())/1e6:.1f}M parameters, "
                  f"max_new_tokens={a.llava_tokens}, batch_size={cfg.batch_size}")
            rows += bench_negatives(ll, four[:a.n // 4], GenConfig(max_new_tokens=a.llava_tokens, batch_size=cfg.batch_size), a.repeats, 'neg-llava')
    print(table(rows))
    return rows


if __name__ == '__main__': main()
