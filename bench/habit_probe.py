#!/usr/bin/env python
"""Where a base (or a round's adapter) stands on the habits, with the world's ground truth (chapter 04's habits, chapter 14).

For the questions of a held-out draw whose habit reaches a wrong option: which of the two rationales (the world's sound one
and the habit's, both with the gold caption) the model finds likelier, teacher-forced, per topic; which one its greedy
reply follows; and greedy accuracy per domain and per topic (`*`: the habit is wrong there, `=`: it happens to be right).

  python bench/habit_probe.py --model embedded [--adapter RUN/round_1/adapter ...] [--n 600] [--seed 777]
  python bench/habit_probe.py --model DIR --oracle 1000 [--epochs 1] [--lr 1e-3]   # first one LoRA round on ground truth

`--oracle N`: one LoRA round (chapter 05's embedded preset) on the world's own sound rationale of each of N training
questions (make_world(N, seed=5)), then the probe: how far the fine-tuning can move the base when the data is perfect.
"""
import argparse, json, math, sys, time
from collections import Counter, defaultdict
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from stl_nb.world import make_world
from stl_nb.templates import positive_prompt, render_rationale, parse_rationale, chat
from stl_nb.models import load_vlm
from stl_nb.embedded import shortcut_reasoning, plain_reasoning, greedy_replies, reasoning_form, EMBEDDED_STYLE
from stl_nb.train import train_qlora, embedded_train_config, Example

def sound_rationale(s) -> str:
    "The training target of the world's own sound rationale for `s` (gold caption, reasoning without its letter)."
    return render_rationale((s.meta['caption'], plain_reasoning(s.meta['reasoning']), s.answer), s.choices, style=EMBEDDED_STYLE)

def habit_questions(samples) -> list:
    "(sample, habit) for the samples whose habit reaches an option other than the gold one."
    out = []
    for s in samples:
        h = shortcut_reasoning(s)
        if h is not None and h[1] in s.choices and h[1] != s.answer_text: out.append((s, h))
    return out

@torch.no_grad()
def target_logp(vlm, samples, targets, batch_size=50) -> list:
    "Sum of log-probabilities of each target under the positive prompt."
    res = []
    for i in range(0, len(samples), batch_size):
        ss, ts = samples[i:i + batch_size], targets[i:i + batch_size]
        b = vlm.encode([s.image for s in ss], [chat(positive_prompt(s, style=EMBEDDED_STYLE)) for s in ss], ts, padding_side='right')
        logits = vlm.model(**{k: v for k, v in b.items() if k != 'labels'}).logits[:, :-1].float()
        labels = b['labels'][:, 1:]
        tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        res += (tok*(labels != -100)).sum(1).tolist()
    return res

def probe(vlm, samples) -> dict:
    "Greedy accuracy (overall, per domain, per topic) and, on the habit questions, the preferred and the followed reasoning."
    texts = greedy_replies(vlm, samples, lambda s: positive_prompt(s, style=EMBEDDED_STYLE))
    parsed = [parse_rationale(t, s.choices) for s, t in zip(samples, texts)]
    dom, dn, top, tn = Counter(), Counter(), Counter(), Counter()
    for s, r in zip(samples, parsed):
        h = shortcut_reasoning(s)
        key = s.topic + ('' if h is None else '*' if h[1] != s.answer_text else '=')
        dn[s.domain] += 1; dom[s.domain] += r.answer == s.answer; tn[key] += 1; top[key] += r.answer == s.answer
    hq = habit_questions(samples)
    ss = [s for s, _ in hq]
    sound = [sound_rationale(s) for s in ss]
    habit = [render_rationale((s.meta['caption'], h[0], s.choices.index(h[1])), s.choices, style=EMBEDDED_STYLE) for s, h in hq]
    diff = [a - b for a, b in zip(target_logp(vlm, ss, sound), target_logp(vlm, ss, habit))]
    by = defaultdict(list)
    for s, d in zip(ss, diff): by[s.topic].append(d)
    idx = {s.id: i for i, s in enumerate(samples)}
    forms, right = Counter(), Counter()
    for s, h in hq:
        r = parsed[idx[s.id]]
        f = reasoning_form(s, r.reasoning, h); forms[f] += 1; right[f] += r.answer == s.answer
    return dict(accuracy=round(100*sum(dom.values())/len(samples), 1),
                domains={d: round(100*dom[d]/dn[d], 1) for d in sorted(dn)},
                topics={k: f'{top[k]}/{tn[k]}' for k in sorted(tn)},
                habit_questions=len(ss), prefers_sound=round(sum(d > 0 for d in diff)/max(1, len(diff)), 3),
                prefers_sound_by_topic={t: round(sum(d > 0 for d in v)/len(v), 2) for t, v in sorted(by.items())},
                greedy_forms=dict(forms), greedy_right_by_form=dict(right))

def oracle_round(vlm, n:int, epochs:float=1.0, lr:float=1e-3, seed:int=0):
    "Fine-tune `vlm` (LoRA, in place) on the world's sound rationales of `n` training questions."
    import random
    train = make_world(n, seed=5, split='train')
    ex = [Example(s.image, chat(positive_prompt(s, style=EMBEDDED_STYLE)), sound_rationale(s), 'positive', s.id) for s in train]
    random.seed(seed); torch.manual_seed(seed)
    return train_qlora(vlm, ex, embedded_train_config(epochs=epochs, lr=lr, seed=seed), progress=False)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='embedded'); p.add_argument('--adapter', nargs='*', default=[None])
    p.add_argument('--n', type=int, default=600); p.add_argument('--seed', type=int, default=777)
    p.add_argument('--oracle', type=int, default=0); p.add_argument('--epochs', type=float, default=1.0); p.add_argument('--lr', type=float, default=1e-3)
    a = p.parse_args()
    samples = make_world(a.n, seed=a.seed, split='test')
    for ad in a.adapter:
        t, vlm = time.time(), load_vlm(a.model, adapter=ad)
        if a.oracle: oracle_round(vlm, a.oracle, a.epochs, a.lr)
        print(json.dumps(dict(model=a.model, adapter=ad, oracle=a.oracle, **probe(vlm, samples), seconds=round(time.time() - t))), flush=True)
