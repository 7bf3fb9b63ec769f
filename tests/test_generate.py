"""stl_nb.generate: batched generation equals one-at-a-time, seeded sampling, the JSONL store, resume after a crash.

Generation runs on a tiny random LLaVA built here in a fraction of a second (a byte-level BPE tokenizer trained on the
world's prompts, CLIP and Llama two layers deep). Its weights are drawn wide (initializer range 0.2) so that its replies
differ from prompt to prompt and from row to row, which is what equality checks need: a model that writes the same
junk for every prompt would pass them trivially. The real LLaVA-1.5 and Qwen2.5-VL processors (shared fixtures) are
checked through tiny random models of their real classes, built as in tests/test_models.py."""
from dataclasses import replace
import json
import pytest, torch
from pathlib import Path
from stl_nb.world import make_world
from stl_nb.models import VLM
from stl_nb.templates import PromptStyle, chat, positive_prompt
from stl_nb.generate import (GenConfig, PROMPT_KINDS, Job, generate, generate_batch, jobs_for, batches, read_records,
                             record_key, records_dataset, reply_jobs, run_jobs, prompt_text, style_of)

STYLE = PromptStyle(intro="answer the question.", sections_line="reply with {names}.", template="{intro} {sections_line}\n{question}{extra}",
                    negative_intro="explain why the option is wrong.", options="options:", direct="answer with the option.",
                    direct_template="{intro} {direct}\n{question}")
_cache = {}

def tiny_vlm(init=0.2, seed=0) -> VLM:
    "A tiny random LLaVA with a real processor (BPE tokenizer on the world's prompts, 48-pixel CLIP images), built once."
    if (init, seed) in _cache: return _cache[init, seed]
    from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
    from transformers import (LlavaConfig, CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration,
                              PreTrainedTokenizerFast, CLIPImageProcessor, LlavaProcessor)
    from stl_nb.templates import negative_prompt, render_rationale
    ss = make_world(120, seed=99)
    corpus = [t for s in ss for t in (positive_prompt(s, style=STYLE), negative_prompt(s, (s.answer + 1) % len(s.choices), style=STYLE),
                                      render_rationale((s.meta['caption'], s.meta['reasoning'], s.answer), s.choices))]
    tok = Tokenizer(models.BPE(unk_token=None)); tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=['<pad>', '<s>', '</s>', '<image>'],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', bos_token='<s>', eos_token='</s>', extra_special_tokens={'image_token': '<image>'})
    ip = CLIPImageProcessor(size={'shortest_edge': 48}, crop_size={'height': 48, 'width': 48}, image_mean=[0.5]*3, image_std=[0.5]*3)
    tmpl = ("{% for m in messages %}{% if m['role']=='user' %}USER: {% for c in m['content'] %}{% if c['type']=='image' %}<image>\n"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %} ASSISTANT:{% else %} {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}")
    proc = LlavaProcessor(image_processor=ip, tokenizer=ft, patch_size=8, vision_feature_select_strategy='default',
                          num_additional_image_tokens=1, chat_template=tmpl)
    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=48, patch_size=8, initializer_range=init)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                     vocab_size=tok.get_vocab_size(), max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     tie_word_embeddings=True, initializer_range=init)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=3, vision_feature_layer=-1,
                                                      vision_feature_select_strategy='default', initializer_range=init)).eval()
    _cache[init, seed] = VLM(model, proc, name='tiny-llava', style=STYLE)
    return _cache[init, seed]

@pytest.fixture
def vlm(): return tiny_vlm()

@pytest.fixture(scope='module')
def world(): return make_world(48, seed=1)

KINDS = ('positive', 'direct')
def run(vlm, samples, path, cfg, **kw):
    return generate(vlm, samples, path, cfg, kinds=KINDS, rnd=1, progress=False, **kw)

from conftest import Crash, crash_after

# --------------------------------------------------------------------------- config, prompts, batches

def test_gen_config_is_checked():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(n=0), dict(batch_size=0), dict(n=2)):
        with pytest.raises(ValueError): GenConfig(**bad)
    assert GenConfig(temperature=0.7, n=3).n == 3

def test_every_kind_has_a_prompt(world):
    s = world[0]
    picked = replace(s, meta=s.meta | dict(predictions=['CONCLUSION: red', 'CONCLUSION: blue']))   # R3V's select needs them
    for kind in PROMPT_KINDS:
        wrong = (s.answer + 1) % len(s.choices) if kind.startswith('negative') else None
        assert prompt_text(picked if kind == 'select' else s, kind, wrong, STYLE)
    assert 'correct answer' in prompt_text(s, 'negative', (s.answer + 1) % len(s.choices))
    assert 'CAPTION' not in prompt_text(s, 'negative-nocap', (s.answer + 1) % len(s.choices))

def test_batches_keep_questions_whole_and_do_not_depend_on_progress(world):
    jobs = jobs_for(world[:10], KINDS, n=3)
    bs = batches(jobs, 8)
    assert sum(bs, []) == jobs and all(len(b) <= 8 for b in bs)
    assert all(len({j.sample.id for j in b}) * 6 == len(b) for b in bs)  # 6 jobs per question, never split

def test_duplicate_sample_ids_are_refused(vlm, world, tmp_path):
    with pytest.raises(ValueError, match='duplicate jobs'): run(vlm, [world[0], world[0]], tmp_path/'x.jsonl', GenConfig(max_new_tokens=4))

# --------------------------------------------------------------------------- batched generation

def test_model_replies_differ_so_equality_checks_mean_something(vlm, world):
    rs = reply_jobs(vlm, jobs_for(world[:16]), GenConfig(max_new_tokens=16))
    assert len({r.text for r in rs}) >= 12

def test_batched_equals_one_at_a_time(world):
    # float64: a random tiny model has near-tied logits, and in float32 the summation order of a padded batch flipped
    # 1 of these 64 greedy replies on one CPU (2026-12-02); in float64 all 64 agree, so the test is about batching, not rounding
    vlm = tiny_vlm(); vlm.model.to(torch.float64)
    cfg = GenConfig(max_new_tokens=20)
    jobs = jobs_for(world[:32], KINDS)
    batched = [r for b in batches(jobs, 16) for r in reply_jobs(vlm, b, cfg)]
    single = [reply_jobs(vlm, [j], cfg)[0] for j in jobs]
    assert batched == single

def test_replies_stop_at_eos_and_count_tokens(vlm, world):
    rs = reply_jobs(vlm, jobs_for(world, KINDS), GenConfig(max_new_tokens=24))
    assert any(r.finished for r in rs) and any(not r.finished for r in rs)
    assert all(r.n_tokens <= 24 for r in rs) and all(r.n_tokens == 24 for r in rs if not r.finished)

def test_sampling_is_seeded_and_leaves_the_global_state_alone(vlm, world):
    cfg = GenConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, n=2)
    imgs, msgs = [s.image for s in world[:6]], [chat(positive_prompt(s, style=STYLE)) for s in world[:6]]
    state = torch.random.get_rng_state()
    a, b, c = (generate_batch(vlm, imgs, msgs, cfg, seed=sd) for sd in (5, 5, 6))
    assert a == b and a != c
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a != generate_batch(vlm, imgs, msgs, GenConfig(max_new_tokens=12))  # and sampling is not greedy

def test_model_generation_config_is_overridden(vlm, world):
    "A repetition penalty or top_k in the model's own generation config must not leak into a GenConfig's decoding."
    cfg, jobs = GenConfig(max_new_tokens=16), jobs_for(world[:8])
    before = reply_jobs(vlm, jobs, cfg)
    gc = vlm.model.generation_config
    old = gc.repetition_penalty, gc.top_k, gc.do_sample
    gc.repetition_penalty, gc.top_k, gc.do_sample = 1.5, 1, True
    try: assert reply_jobs(vlm, jobs, cfg) == before
    finally: gc.repetition_penalty, gc.top_k, gc.do_sample = old

# --------------------------------------------------------------------------- the record store

def test_records_carry_provenance_and_parsed_fields(vlm, world, tmp_path):
    cfg = GenConfig(max_new_tokens=16, batch_size=8)
    recs = generate(vlm, world[:6], tmp_path/'r.jsonl', cfg, kinds=('positive', 'star'), rnd=3, adapter='lora-r3', progress=False)
    assert [record_key(r) for r in recs] == [(s.id, k, None, 0) for s in world[:6] for k in ('positive', 'star')]
    for r in recs:
        assert (r['round'], r['model'], r['adapter']) == (3, 'tiny-llava', 'lora-r3')
        assert r['gen'] == dict(max_new_tokens=16, temperature=0.0, top_p=1.0, n=1, batch_size=8, seed=0)
        assert set(r) >= {'raw', 'caption', 'reasoning', 'explanation', 'answer', 'letter', 'n_tokens', 'finished'}
    assert read_records(tmp_path/'r.jsonl') == recs
    recs = generate(vlm, world[:2], tmp_path/'p.jsonl', cfg, rnd=3, adapter=tmp_path/'adapter', progress=False)  # a path is recorded as text
    assert recs[0]['adapter'] == str(tmp_path/'adapter')

def test_a_file_of_another_run_is_not_appended_to(vlm, world, tmp_path):
    cfg = GenConfig(max_new_tokens=8, batch_size=8)
    run(vlm, world[:4], tmp_path/'r.jsonl', cfg)
    for other, match in [(dict(cfg=GenConfig(max_new_tokens=9, batch_size=8)), 'max_new_tokens'), (dict(rnd=2), "'round': \\(1, 2\\)")]:
        c = other.get('cfg', cfg)
        with pytest.raises(ValueError, match=match):
            generate(vlm, world[:4], tmp_path/'r.jsonl', c, kinds=KINDS, rnd=other.get('rnd', 1), progress=False)

def test_torn_and_malformed_lines(tmp_path):
    p = tmp_path/'r.jsonl'
    good = '{"id": "a", "kind": "positive", "wrong": null, "k": 0}\n'
    p.write_text(good + '{"id": "b", "kind": "pos')
    assert [r['id'] for r in read_records(p)] == ['a'] and p.read_text() != good
    read_records(p, repair=True)
    assert p.read_text() == good and not (tmp_path/'r.jsonl.tmp').exists()
    p.write_text(good + 'oops\n' + good)
    with pytest.raises(ValueError, match='r.jsonl:2'): read_records(p)
    p.write_text(good + '[1, 2]\n')
    with pytest.raises(ValueError, match='r.jsonl:2: not a generation record'): read_records(p)

def test_a_file_with_a_record_twice_is_refused(vlm, world, tmp_path):
    p = tmp_path/'r.jsonl'
    run(vlm, world[:2], p, GenConfig(max_new_tokens=4))
    p.write_text(p.read_text() + p.read_text().splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match='twice'): run(vlm, world[:2], p, GenConfig(max_new_tokens=4))

def test_loads_as_a_datasets_dataset(vlm, world, tmp_path):
    p = tmp_path/'r.jsonl'
    recs = run(vlm, world[:5], p, GenConfig(max_new_tokens=8))
    ds = records_dataset(p)
    assert ds.num_rows == 10 and ds['id'] == [r['id'] for r in recs] and ds[0]['gen']['max_new_tokens'] == 8
    import datasets
    ds2 = datasets.Dataset.from_json(str(p), cache_dir=str(tmp_path/'cache'))
    assert ds2['raw'] == ds['raw'] and ds2['kind'] == ds['kind']

# --------------------------------------------------------------------------- resume and determinism

CONFIGS = [GenConfig(max_new_tokens=20, batch_size=8), GenConfig(max_new_tokens=20, batch_size=8, temperature=0.9, top_p=0.95, n=2)]

@pytest.mark.parametrize('cfg', CONFIGS, ids=['greedy', 'sampled'])
def test_same_seed_gives_identical_files(vlm, world, tmp_path, cfg):
    run(vlm, world[:12], tmp_path/'a.jsonl', cfg); run(vlm, world[:12], tmp_path/'b.jsonl', cfg)
    assert (tmp_path/'a.jsonl').read_bytes() == (tmp_path/'b.jsonl').read_bytes()
    if not cfg.greedy:
        run(vlm, world[:12], tmp_path/'c.jsonl', GenConfig(**{**cfg.__dict__, 'seed': 1}))
        assert [r['raw'] for r in read_records(tmp_path/'c.jsonl')] != [r['raw'] for r in read_records(tmp_path/'a.jsonl')]

@pytest.mark.parametrize('cfg', CONFIGS, ids=['greedy', 'sampled'])
def test_resume_after_a_crash_gives_the_uninterrupted_file(vlm, world, tmp_path, cfg):
    whole, part = tmp_path/'whole.jsonl', tmp_path/'part.jsonl'
    run(vlm, world[:12], whole, cfg)
    for _ in range(2):
        with pytest.raises(Crash): run(vlm, world[:12], part, cfg, on_batch=crash_after(1))
    recs = read_records(part)
    assert len(recs) == 16 and len({record_key(r) for r in recs}) == 16  # one batch, then one more on the second try
    assert run(vlm, world[:12], part, cfg) == read_records(whole)
    assert part.read_bytes() == whole.read_bytes()

@pytest.mark.parametrize('cfg', CONFIGS, ids=['greedy', 'sampled'])
def test_resume_after_a_torn_write_gives_the_uninterrupted_file(vlm, world, tmp_path, cfg):
    whole, part = tmp_path/'whole.jsonl', tmp_path/'part.jsonl'
    data = (run(vlm, world[:12], whole, cfg), whole.read_bytes())[1]
    newlines = [i for i, b in enumerate(data) if b == ord('\n')]
    for cut in (1, newlines[0], newlines[0] + 1, newlines[2] + 7, newlines[9] - 1, len(data) // 2, len(data) - 2):
        part.write_bytes(data[:cut])
        run(vlm, world[:12], part, cfg)
        assert part.read_bytes() == data, cut

def test_resume_skips_done_batches(vlm, world, tmp_path, monkeypatch):
    cfg = GenConfig(max_new_tokens=8, batch_size=4)
    p = tmp_path/'r.jsonl'
    with pytest.raises(Crash): run(vlm, world[:8], p, cfg, on_batch=crash_after(2))
    calls = []
    def counting(vlm_, jobs, cfg_, seed=0):
        calls.append(len(jobs)); return reply_jobs(vlm_, jobs, cfg_, seed)
    run_jobs(vlm, jobs_for(world[:8], KINDS), p, cfg, counting, rnd=1, progress=False)
    assert calls == [4, 4]                                   # 16 jobs in 4 batches, 2 of them done

def test_progress_bar_counts_samples(vlm, world, tmp_path, capsys):
    run(vlm, world[:4], tmp_path/'r.jsonl', GenConfig(max_new_tokens=4))
    generate(vlm, world[:6], tmp_path/'r.jsonl', GenConfig(max_new_tokens=4), kinds=KINDS, rnd=1, progress=True)
    err = capsys.readouterr().err
    assert '12/12' in err and 'sample/s' in err

# --------------------------------------------------------------------------- real processors and real model classes

def test_prompts_of_every_kind_render_and_tokenise_on_the_real_processors(llava_dir, qwen_dir, world):
    from test_models import processor, img
    s = replace(world[0], meta=world[0].meta | dict(predictions=['CONCLUSION: (A) red', 'CONCLUSION: (B) blue']))   # R3V's select
    for d, n_img in [(llava_dir, 576), (qwen_dir, 256)]:
        v = VLM(None, processor(d), name=d.name)
        kinds = [(k, (s.answer + 1) % len(s.choices) if k.startswith('negative') else None) for k in PROMPT_KINDS]
        b = v.encode([img(448, 448) if 'qwen' in d.name else img()] * len(kinds), [chat(prompt_text(s, k, w)) for k, w in kinds])
        assert ((b['input_ids'] == v.image_token_id).sum(1) == n_img).all()
        for i, (k, w) in enumerate(kinds):
            text = v.tokenizer.decode(b['input_ids'][i][b['attention_mask'][i].bool()])
            assert prompt_text(s, k, w).splitlines()[-1] in text

@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory): return tmp_path_factory.mktemp('tiny_gen')

@pytest.mark.parametrize('kind', ['llava', 'qwen', 'generic'])
def test_generate_on_tiny_models_of_the_real_classes(kind, llava_dir, qwen_dir, tiny_root, world, tmp_path):
    from test_models import tiny_dir
    from stl_nb.models import load_vlm
    v = load_vlm(tiny_dir(qwen_dir if kind == 'qwen' else llava_dir, 'qwen' if kind == 'qwen' else 'llava', tiny_root))
    if kind == 'generic': v = VLM(v.model, v.processor, name='generic', kind='generic')
    cfg = GenConfig(max_new_tokens=6, batch_size=4)
    recs = generate(v, world[:6], tmp_path/'r.jsonl', cfg, kinds=KINDS, progress=False)
    assert len(recs) == 12 and all(0 < r['n_tokens'] <= 6 for r in recs)
    single = [reply_jobs(v, [j], cfg)[0].text for j in jobs_for(world[:6], KINDS)]
    assert [r['raw'] for r in recs] == single
