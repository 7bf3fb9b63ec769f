#!/usr/bin/env python
"""Chapter 06c's CPU savings side by side, in one run: a round's jobs (rationales, then negatives of some questions) with the
embedded model, batched in job order or by length, decoded by `generate` or with finished rows leaving the batch
(`generate_compact`), and the 4-bit model + adapter against its merged copy. Prints pad tokens, decode row-steps, wall time
and each as a ratio of today's path; the replies of every variant are compared with today's.

    OMP_NUM_THREADS=1 python bench/fastgen_cpu.py --out bench/results/fastgen-cpu.json
"""
import argparse, gc, json, time
from pathlib import Path

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--questions', type=int, default=96, help='questions with a rationale job each')
    p.add_argument('--negatives', type=int, default=24, help='of them, questions with a negative job per wrong option')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--new-tokens', type=int, default=128)
    p.add_argument('--out', default=None, help='also write the rows as JSON')
    return p.parse_args(argv)

def jobs_of(a):
    from stl_nb.generate import Job
    from stl_nb.world import make_world
    S = make_world(a.questions, seed=5, split='test')
    return [Job(s, 'positive') for s in S] + [Job(s, 'negative', w) for s in S[:a.negatives] for w in range(len(s.choices)) if w != s.answer]

def run(vlm, jobs, a, sort, compact):
    "Replies in job order, pad tokens, decode row-steps (as run) and seconds of one variant."
    from stl_nb import fastgen as F
    from stl_nb.generate import GenConfig, batches, reply_jobs, prompt_text, style_of
    from stl_nb.templates import chat
    cfg, L, style = GenConfig(max_new_tokens=a.new_tokens, batch_size=a.batch), F.prompt_lengths(vlm, jobs), style_of(vlm)
    order = F.by_length(jobs, L) if sort else jobs
    out, stats, steps, t0 = {}, {}, 0, time.perf_counter()
    for b in batches(order, a.batch):
        imgs, msgs = [j.sample.image for j in b], [chat(prompt_text(j.sample, j.kind, j.distractor, style)) for j in b]
        rs = F.generate_compact(vlm, imgs, msgs, cfg, stats=stats) if compact else reply_jobs(vlm, b, cfg)
        if not compact: steps += len(b)*max(r.n_tokens for r in rs)   # generate decodes every row until the longest ends
        out.update((j.key, r) for j, r in zip(b, rs))
    secs = time.perf_counter() - t0
    return [out[j.key] for j in jobs], F.padding(jobs, L, a.batch, sort), stats.get('row_steps', steps), secs

def main(argv=None):
    a = parse_args(argv)
    import torch
    from transformers.utils import logging; logging.disable_progress_bar(); logging.set_verbosity_error()
    from stl_nb import fastgen as F
    from stl_nb.models import load_vlm
    jobs, rows = jobs_of(a), []
    vlm = load_vlm('embedded')
    run(vlm, jobs[:a.batch], a, False, False)                            # warm-up
    ref = None
    for name, sort, compact in (('today: job order, generate', False, False), ('sorted by length', True, False),
                                ('finished rows leave', False, True), ('sorted + finished rows leave', True, True)):
        rs, pad, steps, secs = run(vlm, jobs, a, sort, compact)
        ref = ref or (rs, pad, steps, secs)
        rows.append(dict(variant=name, pad_tokens=pad, row_steps=steps, seconds=round(secs, 2),
                         identical=sum(x == y for x, y in zip(rs, ref[0]))))
    q = load_vlm('embedded', quant='4bit')
    from peft import LoraConfig, get_peft_model
    from stl_nb.train import lora_targets
    torch.manual_seed(0)
    q.model = get_peft_model(q.model, LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets(q.model), init_lora_weights=False)).eval()
    for n, p in q.model.named_parameters():
        if 'lora_B' in n: p.data *= 0.05
    r4, pad, steps, s4 = run(q, jobs, a, False, False)
    rows.append(dict(variant='4-bit + adapter (job order)', pad_tokens=pad, row_steps=steps, seconds=round(s4, 2), identical=None))
    m = F.merge_16bit(q); del q; gc.collect()
    r16, pad, steps, s16 = run(m, jobs, a, False, False)
    rows.append(dict(variant='merged copy (float32 on CPU)', pad_tokens=pad, row_steps=steps, seconds=round(s16, 2),
                     identical=sum(x == y for x, y in zip(r16, r4)), vs='4-bit'))
    rows[-2]['vs'] = rows[-1]['vs'] = '4-bit'
    print(f"{len(jobs)} jobs ({a.questions} rationales + {len(jobs) - a.questions} negatives), batch {a.batch}, "
          f"≤{a.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    print(f"{'variant':<32} {'pad tok':>8} {'×':>5} {'row-steps':>10} {'×':>5} {'seconds':>8} {'×':>5}  identical")
    for r in rows:
        b = rows[4] if r.get('vs') else rows[0]
        print(f"{r['variant']:<32} {r['pad_tokens']:>8} {r['pad_tokens']/max(b['pad_tokens'], 1):5.2f} {r['row_steps']:>10} "
              f"{r['row_steps']/b['row_steps']:5.2f} {r['seconds']:>8} {r['seconds']/b['seconds']:5.2f}  "
              + ('(reference)' if r is b else f"{r['identical']}/{len(jobs)}"))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(date=time.strftime('%Y-%m-%d %H:%M %Z'), args=vars(a), rows=rows), indent=1))
    return rows

if __name__ == '__main__': main()
