"""stl_nb.negatives and stl_nb.shared_prefix (appendix 08a): shared-prefix generation gives the straightforward way's replies, the training form never shows the
answer, the audit counts what it says, and a round runs (and resumes) from one call.

The model is the tiny random LLaVA of tests/test_generate.py (varied replies, so equality means something); the real
LLaVA-1.5 and Qwen2.5-VL processors come from the shared fixtures."""
import json
from dataclasses import asdict
from pathlib import Path
import pytest, torch
import stl_nb
from stl_nb.data import SampleError, letter, letter_index
from stl_nb.world import make_world
from stl_nb.models import VLM
from stl_nb.templates import PromptStyle, chat, negative_prompt, render_rationale, render_negative
from stl_nb.generate import GenConfig, Job, Reply, make_record, read_records, reply_jobs, generate_batch, prompt_text, batches
from stl_nb.keep import keep_correct
from stl_nb.negatives import (negative_jobs, make_negatives, negative_examples, audit_negatives, audit_one, generate_round,
                              AUDIT)
from stl_nb.shared_prefix import split_prompts, shares_prefix, generate_shared, reply_shared, cascades, prefix_mode
import stl_nb.shared_prefix as shared_prefix
from test_generate import tiny_vlm, STYLE
from conftest import Crash, crash_after

WORLD = make_world(60, seed=2)
PROV = dict(round=0, model='reference', adapter=None, gen=asdict(GenConfig()))
kept_of = lambda samples: [dict(id=s.id, kind='positive') for s in samples]

@pytest.fixture
def vlm(): return tiny_vlm()

from conftest import written

# --------------------------------------------------------------------------- jobs and prompt splitting

def test_a_job_per_wrong_option_of_each_kept_question_once():
    kept = kept_of(WORLD[:10]) + kept_of(WORLD[:3])                  # questions kept twice (two sampled replies right)
    jobs = negative_jobs(kept, WORLD, n=2)
    assert len(jobs) == 2 * sum(len(s.choices) - 1 for s in WORLD[:10])
    assert all(j.distractor != j.sample.answer and j.kind == 'negative' for j in jobs)
    assert len({j.key for j in jobs}) == len(jobs)
    assert {j.kind for j in negative_jobs(kept, WORLD, caption=False)} == {'negative-nocap'}
    with pytest.raises(SampleError, match="'nope'"): negative_jobs([dict(id='nope', kind='positive')], WORLD)

def test_the_prefix_holds_the_image_and_the_suffix_names_the_distractor(vlm):
    jobs = negative_jobs(kept_of([s for s in WORLD if len(s.choices) > 2][:8]), WORLD)   # two distractors or more
    ids, _, _ = vlm._prompt_ids([j.sample.image for j in jobs], [chat(prompt_text(j.sample, j.kind, j.distractor, STYLE)) for j in jobs])
    pre, suf, owner = split_prompts(ids, [j.sample.id for j in jobs])
    assert len(pre) == 8 and all(p + s == x for p, s, x in zip((pre[o] for o in owner), suf, ids))
    assert all(p.count(vlm.image_token_id) == 36 for p in pre) and not any(vlm.image_token_id in s for s in suf)
    for j, s in zip(jobs, suf): assert j.sample.choices[j.distractor] in vlm.tokenizer.decode(s)

# --------------------------------------------------------------------------- shared prefix == straightforward

def plain_and_shared(vlm, jobs, cfg, size):
    plain = [r for b in batches(jobs, size) for r in reply_jobs(vlm, b, cfg)]
    shared = [r for b in batches(jobs, size) for r in reply_shared(vlm, b, cfg)]
    return plain, shared

@pytest.mark.parametrize('size', [3, 10, 32])
def test_shared_prefix_gives_the_straightforward_replies(vlm, size):
    jobs = negative_jobs(kept_of(WORLD[:40]), WORLD)
    cfg = GenConfig(max_new_tokens=24)
    plain, shared = plain_and_shared(vlm, jobs, cfg, size)
    assert shared == plain
    assert len({r.text for r in plain}) > len(jobs) // 2               # the replies differ: the check is not vacuous

def test_shared_prefix_equals_one_prompt_at_a_time(vlm):
    jobs = negative_jobs(kept_of(WORLD[:6]), WORLD)
    cfg = GenConfig(max_new_tokens=20)
    alone = [reply_jobs(vlm, [j], cfg)[0] for j in jobs]
    assert [r for b in batches(jobs, 12) for r in reply_shared(vlm, b, cfg)] == alone

def test_decoding_reads_one_prefix_per_question(vlm, monkeypatch):
    "The cascade path is the one taken (one prefix per question in the cache), and the copying path gives the same replies."
    jobs = negative_jobs(kept_of(WORLD[:10]), WORLD)
    cfg = GenConfig(max_new_tokens=16)
    seen = []
    monkeypatch.setattr(shared_prefix, 'prefix_cache', lambda c, o, f=shared_prefix.prefix_cache: seen.append(f(c, o)) or seen[-1])
    assert cascades(vlm) and reply_shared(vlm, jobs, cfg) == reply_jobs(vlm, jobs, cfg)
    layer = seen[0].layers[0]
    assert layer.prefix_values.shape[0] == 10 and layer.keys.shape[0] == len(jobs)      # 10 prefixes for the rows of 10 questions
    monkeypatch.setattr(shared_prefix, 'cascades', lambda v: False)
    assert reply_shared(vlm, jobs, cfg) == reply_jobs(vlm, jobs, cfg)

def test_interleaved_and_uneven_groups(vlm):
    "Rows of different questions interleaved, groups of 1 to 3 rows: still each prompt's own replies."
    jobs = negative_jobs(kept_of(WORLD[:6]), WORLD)
    jobs = jobs[::2] + jobs[1::2] + [Job(WORLD[7], 'negative', (WORLD[7].answer + 1) % len(WORLD[7].choices))]
    msgs = [chat(prompt_text(j.sample, j.kind, j.distractor, STYLE)) for j in jobs]
    imgs, groups, cfg = [j.sample.image for j in jobs], [j.sample.id for j in jobs], GenConfig(max_new_tokens=16)
    assert generate_shared(vlm, imgs, msgs, groups, cfg) == generate_batch(vlm, imgs, msgs, cfg)

def test_grouped_query_attention():
    "Fewer key/value heads than query heads (as in many newer models): the cascade gives the plain batch's replies."
    from transformers import LlavaForConditionalGeneration
    base = tiny_vlm()
    c = base.model.config.to_dict(); c['text_config'].update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(3)
    m = LlavaForConditionalGeneration(type(base.model.config).from_dict(c)).eval()
    v = VLM(m, base.processor, name='tiny-gqa', style=STYLE)
    jobs = negative_jobs(kept_of(WORLD[:8]), WORLD)
    cfg = GenConfig(max_new_tokens=16)
    plain = reply_jobs(v, jobs, cfg)
    assert cascades(v) and reply_shared(v, jobs, cfg) == plain and len({r.text for r in plain}) > len(jobs) // 2

def test_prefix_mode_restores_the_attention(vlm):
    "The language model attends as before after a call, even one that fails."
    conf = vlm.model.get_decoder().config
    before = conf._attn_implementation
    with pytest.raises(RuntimeError):
        with prefix_mode(vlm, None):
            assert conf._attn_implementation == 'stl_prefix'
            raise RuntimeError
    assert conf._attn_implementation == before

def test_shared_prefix_without_any_padding(vlm):
    "Suffixes of one length and a single question: no padding at all, so generate drops the mask; still identical."
    s = next(s for s in WORLD if len(s.choices) == 2) if any(len(s.choices) == 2 for s in WORLD) else WORLD[0]
    jobs = negative_jobs(kept_of([s]), WORLD)
    cfg = GenConfig(max_new_tokens=16)
    assert reply_shared(vlm, jobs, cfg) == reply_jobs(vlm, jobs, cfg)
    one = [Job(s, 'negative', (s.answer + 1) % len(s.choices))]
    assert reply_shared(vlm, one, cfg) == reply_jobs(vlm, one, cfg)

def test_shared_prefix_nocap_and_sampled(vlm):
    jobs = negative_jobs(kept_of(WORLD[:12]), WORLD, caption=False)
    assert reply_shared(vlm, jobs, GenConfig(max_new_tokens=16)) == reply_jobs(vlm, jobs, GenConfig(max_new_tokens=16))
    hot = GenConfig(max_new_tokens=16, temperature=1.0)
    a, b, c = reply_shared(vlm, jobs, hot, 1), reply_shared(vlm, jobs, hot, 1), reply_shared(vlm, jobs, hot, 2)
    assert a == b and a != c

def test_models_that_cannot_share_fall_back_to_a_plain_batch(vlm):
    generic = VLM(vlm.model, vlm.processor, name='generic', kind='generic', style=STYLE)
    assert shares_prefix(vlm) and not shares_prefix(generic)
    jobs = negative_jobs(kept_of(WORLD[:5]), WORLD)
    cfg = GenConfig(max_new_tokens=12)
    assert reply_shared(generic, jobs, cfg) == reply_jobs(vlm, jobs, cfg)

# --------------------------------------------------------------------------- records, resume

def test_make_negatives_records_provenance_and_resumes(vlm, tmp_path):
    cfg = GenConfig(max_new_tokens=16, batch_size=9)
    whole, part = tmp_path/'whole.jsonl', tmp_path/'part.jsonl'
    recs = make_negatives(vlm, kept_of(WORLD[:12]), WORLD, whole, cfg, rnd=2, adapter='r1', progress=False)
    jobs = negative_jobs(kept_of(WORLD[:12]), WORLD)
    assert [(r['id'], r['kind'], r['wrong'], r['round'], r['adapter']) for r in recs] == \
           [(j.sample.id, 'negative', letter(j.distractor), 2, 'r1') for j in jobs]
    assert [r['raw'] for r in recs] == [r.text for r in reply_jobs(vlm, jobs, cfg)]
    with pytest.raises(Crash): make_negatives(vlm, kept_of(WORLD[:12]), WORLD, part, cfg, rnd=2, adapter='r1', progress=False, on_batch=crash_after(2))
    data = whole.read_bytes()
    part.write_bytes(part.read_bytes() + data[len(part.read_bytes()):][:40])   # and a torn line
    make_negatives(vlm, kept_of(WORLD[:12]), WORLD, part, cfg, rnd=2, adapter='r1', progress=False)
    assert part.read_bytes() == data

# --------------------------------------------------------------------------- training form

@pytest.mark.parametrize('caption', [True, False])
@pytest.mark.parametrize('style', [PromptStyle(), STYLE, PromptStyle(correct='Psst: it is {letter}!', option='{letter}. {text}')])
def test_the_training_form_never_contains_the_correct_answer(caption, style):
    "Named invariant: a negative's training prompt never states the correct answer; its generation prompt does."
    kind = 'negative' if caption else 'negative-nocap'
    recs = [make_record(j, Reply(written(j.sample, j.distractor, caption), 50, True), PROV)
            for j in negative_jobs(kept_of(WORLD), WORLD, caption=caption)]
    ex = negative_examples(recs, WORLD, style)
    assert len(ex) == len(recs) > 100
    for (img, msgs, target), r in zip(ex, recs):
        s = next(x for x in WORLD if x.id == r['id'])
        said = style.correct.format(option=style.option.format(letter=s.answer_letter, lower=s.answer_letter.lower(), text=s.answer_text),
                                    letter=s.answer_letter, lower=s.answer_letter.lower(), text=s.answer_text)
        train_text = msgs[0]['content'][1]['text']
        assert said in prompt_text(s, kind, letter_index(r['wrong']), style)
        assert said not in train_text and style.correct.split('{')[0] not in train_text
        assert train_text == negative_prompt(s, letter_index(r['wrong']), show_answer=False, caption=caption, style=style)
        assert target == written(s, letter_index(r['wrong']), caption) and img is s.image

# --------------------------------------------------------------------------- audit

def test_audit_counts_what_it_says():
    jobs = negative_jobs(kept_of(WORLD[:30]), WORLD)
    good = [make_record(j, Reply(written(j.sample, j.distractor), 50, True), PROV) for j in jobs]
    a = audit_negatives(good, WORLD)
    assert (a.n, a.n_captions) == (len(good), len(good))
    assert a.counts == dict(names_distractor=len(good), mentions_distractor=len(good), blames_answer=0,
                            explanation_hallucinates=0, caption_hallucinates=0, caption_misses=0)
    blamed = dict(good[0], raw=good[0]['raw'].replace(f"option ({good[0]['wrong']})", f"option ({WORLD[0].answer_letter})"))
    f = audit_one(blamed, WORLD[0])
    assert f['blames_answer'] and not f['names_distractor']
    s = next(x for x in WORLD[:30] if 'middle: nothing.' in x.meta['caption'])
    r = next(r for r in good if r['id'] == s.id)
    f = audit_one(dict(r, raw=r['raw'].replace('middle: nothing.', 'middle: large green diamond.', 1)), s)
    assert f['caption_hallucinates']
    nocap = make_record(Job(s, 'negative-nocap', letter_index(r['wrong'])), Reply(written(s, letter_index(r['wrong']), False), 9, True), PROV)
    assert set(audit_one(nocap, s)) == set(AUDIT) - {'caption_hallucinates', 'caption_misses'}
    assert audit_negatives([nocap], WORLD).rate('caption_misses') is None

def test_audit_needs_world_samples():
    from stl_nb.data import Sample
    s = Sample('q', WORLD[0].image, 'why?', ['a', 'b'], 0)
    r = make_record(Job(s, 'negative', 1), Reply('CAPTION: x\n\nEXPLANATION: y', 5, True), PROV)
    with pytest.raises(SampleError, match='scene graph'): audit_negatives([r], [s])

# --------------------------------------------------------------------------- one round from one call

def test_a_round_from_one_call(vlm, tmp_path, monkeypatch):
    "Positives scripted (right for two questions in three), negatives generated by the model; files, counts and resume."
    import stl_nb.generate as G
    real = G.reply_jobs
    def scripted(v, jobs, cfg, seed=0):
        return [Reply(render_rationale((j.sample.meta['caption'], j.sample.meta['reasoning'],
                                        j.sample.answer if i % 3 else (j.sample.answer + 1) % len(j.sample.choices)), j.sample.choices), 40, True)
                if j.kind == 'positive' else real(v, [j], cfg, seed)[0] for i, j in ((int(j.sample.id[-6:]), j) for j in jobs)]
    monkeypatch.setattr(G, 'reply_jobs', scripted)
    samples, cfg = WORLD[:24], GenConfig(max_new_tokens=12, batch_size=12)
    rd = generate_round(vlm, samples, tmp_path/'r1', cfg, rnd=1, progress=False)
    right = [s for s in samples if int(s.id[-6:]) % 3]
    assert [r['id'] for r in rd.kept] == [s.id for s in right] and rd.report.by_reason == {'wrong_answer': 8}
    assert len(rd.negatives) == sum(len(s.choices) - 1 for s in right) == rd.negative_report.generated
    assert rd.audit is not None and rd.audit.n == rd.negative_report.kept
    summary = json.loads((tmp_path/'r1'/'round.json').read_text())
    assert summary['positives']['kept'] == len(right) and summary['negatives']['generated'] == len(rd.negatives)
    assert len(rd.examples(samples)) == rd.report.kept + rd.negative_report.kept
    neg = (tmp_path/'r1'/'negatives.jsonl').read_bytes()
    (tmp_path/'r1'/'negatives.jsonl').write_bytes(neg[:len(neg) // 3])
    (tmp_path/'r1'/'positives.jsonl').write_bytes((tmp_path/'r1'/'positives.jsonl').read_bytes()[:-5])
    rd2 = generate_round(vlm, samples, tmp_path/'r1', cfg, rnd=1, progress=False)
    assert (tmp_path/'r1'/'negatives.jsonl').read_bytes() == neg and rd2.negatives == rd.negatives and rd2.kept == rd.kept

EMBEDDED = (Path(stl_nb.__file__).parent/'assets'/'embedded'/'config.json').exists()

@pytest.mark.skipif(not EMBEDDED, reason='the embedded model is not built (stl_nb/assets/embedded)')
def test_a_round_of_the_embedded_model(tmp_path):
    from stl_nb.models import load_vlm
    v = load_vlm('embedded')
    samples = make_world(24, seed=7)
    cfg = GenConfig(max_new_tokens=160, batch_size=24)
    rd = generate_round(v, samples, tmp_path, cfg, rnd=1, progress=False)
    kept = {r['id'] for r in rd.kept}
    assert rd.report.kept > 0 and rd.negative_report.generated == sum(len(s.choices) - 1 for s in samples if s.id in kept)
    assert rd.audit.n == rd.negative_report.kept and all(r['finished'] for r in rd.positives)   # its replies end by themselves
    neg = (tmp_path/'negatives.jsonl').read_bytes()
    (tmp_path/'negatives.jsonl').write_bytes(neg[:len(neg) // 2])
    assert generate_round(v, samples, tmp_path, cfg, rnd=1, progress=False).negatives == rd.negatives
    assert (tmp_path/'negatives.jsonl').read_bytes() == neg

# --------------------------------------------------------------------------- real processors and real model classes

def test_negative_prompts_split_on_the_real_processors(llava_dir, qwen_dir):
    from test_models import processor, img
    s = next(x for x in WORLD if len(x.choices) == 4)
    jobs = negative_jobs(kept_of([s]), WORLD)
    for d, n_img, size in [(llava_dir, 576, 336), (qwen_dir, 256, 448)]:
        v = VLM(None, processor(d), name=d.name)
        msgs = [chat(prompt_text(s, j.kind, j.distractor)) for j in jobs]
        ids, _, _ = v._prompt_ids([img(size, size)] * 3, msgs)
        pre, suf, _ = split_prompts(ids, [s.id] * 3)
        assert pre[0].count(v.image_token_id) == n_img and not any(v.image_token_id in x for x in suf)
        for j, x in zip(jobs, suf): assert s.choices[j.distractor] in v.tokenizer.decode(x)
        assert all(len(x) < 20 for x in suf)
        b = v.encode([img(size, size)] * 3, [chat(negative_prompt(s, j.distractor, show_answer=False)) for j in jobs])
        assert 'The correct answer is' not in v.tokenizer.decode(b['input_ids'][0])

@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory): return tmp_path_factory.mktemp('tiny_neg')

@pytest.mark.parametrize('kind', ['llava', 'qwen'])
def test_negatives_on_tiny_models_of_the_real_classes(kind, llava_dir, qwen_dir, tiny_root, tmp_path):
    "LLaVA shares the prefix; Qwen2.5-VL takes the plain batch. Both give the replies of one prompt at a time."
    from test_models import tiny_dir
    from stl_nb.models import load_vlm
    v = load_vlm(tiny_dir(qwen_dir if kind == 'qwen' else llava_dir, kind, tiny_root))
    assert shares_prefix(v) == (kind == 'llava')
    cfg = GenConfig(max_new_tokens=6, batch_size=8)
    recs = make_negatives(v, kept_of(WORLD[:4]), WORLD, tmp_path/'n.jsonl', cfg, progress=False)
    alone = [reply_jobs(v, [j], cfg)[0].text for j in negative_jobs(kept_of(WORLD[:4]), WORLD)]
    assert [r['raw'] for r in recs] == alone

def test_shared_prefix_through_a_lora_adapter(tmp_path):
    "The loop generates with LoRA adapters: the shared prefix must go through a `PeftModel` as well."
    from peft import LoraConfig, get_peft_model
    base = tiny_vlm(seed=1)
    torch.manual_seed(0)
    peft_model = get_peft_model(base.model, LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False)).eval()
    v = VLM(peft_model, base.processor, name='tiny+lora', style=STYLE)
    jobs = negative_jobs(kept_of(WORLD[:8]), WORLD)
    cfg = GenConfig(max_new_tokens=12)
    with_lora = reply_jobs(v, jobs, cfg)
    assert reply_shared(v, jobs, cfg) == with_lora
    with peft_model.disable_adapter(): assert reply_jobs(v, jobs, cfg) != with_lora   # the adapter does change the replies


# --------------------------------------------------------------------------- the transformers internals the cascade leans on

def test_prefix_cascade_assumptions_hold(vlm):
    """The shared-prefix cascade (appendix 08a) relies on transformers internals that no release promises to keep: a cache
    made of `layers` with `layer_class_to_replicate`, `DynamicLayer`'s fields, the attention and mask registries, and
    the language model's `config._attn_implementation`. A release that moves one of them fails here, by name, instead
    of the cascade silently turning itself off (`cascades` False: the copied-prefix path, slower) or breaking."""
    import inspect
    from transformers import AttentionInterface, DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    c = DynamicCache()
    assert hasattr(c, 'layers') and hasattr(c, 'layer_class_to_replicate'), 'DynamicCache layout changed'
    for name in ('get_seq_length', 'batch_repeat_interleave', 'batch_select_indices', 'update'):
        assert callable(getattr(DynamicLayer, name, None)), f'DynamicLayer.{name} is gone'
    assert hasattr(DynamicLayer(), 'is_initialized'), 'DynamicLayer fields changed'
    assert callable(AttentionInterface.register) and callable(AttentionMaskInterface.register) and callable(eager_mask)
    from stl_nb.shared_prefix import _decoder, _base_model
    assert _decoder(vlm).config._attn_implementation in ('sdpa', 'eager'), 'the attention implementation is named elsewhere'
    assert cascades(vlm), 'the embedded (Llama) model no longer cascades: the fast path is off'
    params = inspect.signature(_base_model(vlm).forward).parameters
    assert 'cache' in params or 'past_key_values' in params, 'the forward pass takes its cache under another name'
