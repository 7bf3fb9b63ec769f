#!/usr/bin/env python
"""Where the time of a batch of negatives goes on the embedded model: the prompt's encoding, then the cost of one decoding step,
for the independent prompts and for the shared prefix, each also with its attention skipped (which leaves the rest of a step:
projections, MLP, norms, the cache's growth, Python). CPU time of this process, best of `--repeats`.

    python bench/profile_negatives.py [--steps 60] [--repeats 3] [--batch-size 64]

  independent                     the prompts in full, the cache one copy of each prompt per row (`generate_batch`'s way)
  shared prefix (cascade)         one prefix per question, each row's suffix and reply after it (`generate_shared`)
  shared, prefix copied per row   the prefixes encoded once, then copied to each row (`Cache.batch_select_indices`)
  ..., attention skipped          the same steps with an attention that returns its queries: what is left is not attention
"""
import argparse, contextlib, time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=60); p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--batch-size', type=int, default=64)
    a = p.parse_args(argv)
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar(); hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    from stl_nb.models import load_vlm
    from stl_nb.world import make_world
    from stl_nb.generate import batches, prompt_text, style_of, on_device, pad_id
    from stl_nb.templates import chat
    from stl_nb import shared_prefix as N
    from stl_nb.negatives import negative_jobs
    vlm = load_vlm('embedded'); M, conf = vlm.model, vlm.model.get_decoder().config
    four = [s for s in make_world(512, seed=0) if len(s.choices) == 4][:64]
    g = batches(negative_jobs([dict(id=s.id, kind='positive') for s in four], four), a.batch_size)[0]
    msgs, imgs = [chat(prompt_text(j.sample, j.kind, j.distractor, style_of(vlm))) for j in g], [j.sample.image for j in g]
    AttentionInterface.register('skip', lambda m, q, k, v, mask, scaling, dropout=0., **kw: (q.transpose(1, 2).contiguous(), None))
    AttentionMaskInterface.register('skip', eager_mask)

    def independent():
        b = on_device(vlm, vlm.encode(imgs, msgs, padding_side='left'))
        c0 = time.process_time(); cache = M(**b, use_cache=True, logits_to_keep=1).cache
        return time.process_time() - c0, cache, b['attention_mask']

    def shared(copy):
        ids, _, rest = vlm._prompt_ids(imgs, msgs)
        pre, suf, owner = N.split_prompts(ids, [j.sample.id for j in g])
        p_ids, p_mask, rows = N._rows(pre, suf, owner, pad_id(vlm))
        c0, lp = time.process_time(), p_ids.shape[1]
        cache = N._prefill(vlm, p_ids, p_mask, {k: v[[owner.index(x) for x in range(len(pre))]] for k, v in rest.items()})
        if copy: cache.batch_select_indices(torch.tensor(owner))
        else: cache = N.prefix_cache(cache, owner)
        pos = (rows['attention_mask'].cumsum(-1) - 1).clamp(min=0)[:, lp:]
        with contextlib.nullcontext() if copy else N.prefix_mode(vlm, cache):   # the suffixes
            M(input_ids=rows['input_ids'][:, lp:], attention_mask=rows['attention_mask'], position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        return time.process_time() - c0, cache, rows['attention_mask']

    def step_cost(cache, mask, attention):
        "CPU seconds per decoding step, over `a.steps` one-token steps."
        before, token = conf._attn_implementation, N._active.set(cache)
        conf._attn_implementation = attention or before
        try:
            c0 = time.process_time()
            for _ in range(a.steps):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                M(input_ids=torch.full((len(mask), 1), 5), attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                  cache=cache, use_cache=True, logits_to_keep=1)
            return (time.process_time() - c0) / a.steps
        finally: conf._attn_implementation = before; N._active.reset(token)

    ways = {'independent': (independent, None), 'independent, attention skipped': (independent, 'skip'),
            'shared prefix (cascade)': (lambda: shared(False), 'stl_prefix'), 'shared, prefix copied per row': (lambda: shared(True), None),
            'shared, attention skipped': (lambda: shared(False), 'skip')}
    best = {}
    with torch.inference_mode():
        for _ in range(a.repeats):
            for name, (start, attention) in ways.items():
                t, cache, mask = start()
                s = step_cost(cache, mask, attention)
                best[name] = tuple(min(x, y) for x, y in zip(best.get(name, (9e9, 9e9)), (t, s)))
    print(f"embedded model, {len(g)} negative prompts of {len(set(j.sample.id for j in g))} questions ({len(vlm._prompt_ids(imgs[:1], msgs[:1])[0][0])} tokens each), "
          f"decoding steps from the prompt to {a.steps} tokens after it; CPU time, best of {a.repeats}")
    print(f"{'':<34}{'prompt ms':>10}{'ms per step':>13}")
    for k, (t, s) in best.items(): print(f"{k:<34}{t*1e3:>10.1f}{s*1e3:>13.2f}")
    return best


if __name__ == '__main__': main()
