"Chapter 06c: the generation-time model (plan, merge, the loop's hook), length-sorted batches and compacted decoding, on the CPU."
import gc, weakref
import pytest, torch
from types import SimpleNamespace as NS
from stl_nb import fastgen as F
from stl_nb.models import load_vlm, plan_memory, tiny_model
from stl_nb.generate import GenConfig, Job, jobs_for, generate_batch, reply_jobs, run_jobs, prompt_text, style_of
from stl_nb.templates import chat
from stl_nb.world import make_world

pytest.importorskip('bitsandbytes')

def n4(model): return sum(type(m).__name__ == 'Linear4bit' for m in model.modules())

def add_adapter(model, seed=0, scale=0.05):
    "`model` with a random, non-zero LoRA adapter on its language model's linear layers."
    from peft import LoraConfig, get_peft_model
    from stl_nb.train import lora_targets
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets(model), init_lora_weights=False))
    for n, p in pm.named_parameters():
        if 'lora_B' in n: p.data *= scale
    return pm.eval()

def close(a, b, rel=0.01):
    "Logits equal up to rounding (bitsandbytes' CPU 4-bit matmul is not float32 throughout): within 1% of their range."
    return (a - b).abs().max() <= rel*b.abs().max()

@pytest.fixture(scope='module')
def world(): return make_world(40, seed=3, split='test')

# --------------------------------------------------------------------------- the plan

def test_plan_real_llava(llava_dir):
    p, w = plan_memory(llava_dir, 'A100-80'), F.plan_generation(llava_dir and __import__('transformers').AutoConfig.from_pretrained(llava_dir), 'A100-80')
    assert w.merge and w.weights_16bit == 2*p.params and w.weights_4bit == p.weights
    assert w.kv_per_row == 32*2*32*128*2048*2                       # layers × (k, v) × heads × head dim × tokens × 2 bytes
    assert w.batch_size == int((85.1e9 - 2e9 - w.weights_16bit)/w.kv_per_row) == 64

@pytest.mark.parametrize('gpu,batch,merge,why', [
    ('T4', 16, False, 'do not fit together'), ('L4', 16, False, 'fewer than the batch of 16'),
    ('A100-40', 16, True, 'fits with 24 rows'), ('A100-40', 32, False, 'room for 24 rows'), (141e9, 8, True, 'fits with 116 rows')])
def test_plan_decisions(llava_dir, gpu, batch, merge, why):
    from transformers import AutoConfig
    p = F.plan_generation(AutoConfig.from_pretrained(llava_dir), gpu, batch_size=batch)
    assert p.merge == merge and why in p.reason and (p.batch_size >= batch) == merge, p

def test_plan_caps_and_fallbacks(qwen_dir):
    from transformers import AutoConfig
    q = AutoConfig.from_pretrained(qwen_dir)
    assert F.plan_generation(q, 141e9, max_batch=128).batch_size == 128            # GQA: 4 KV heads, many rows fit
    assert not F.plan_generation(q, None).merge and 'no GPU' in F.plan_generation(q, None).reason
    assert F.plan_generation(q, 'H100-80', quant=None).reason == 'the base is not 4-bit: it generates as loaded'
    assert 'keep the 4-bit model' in repr(F.plan_generation(q, 'T4'))

# --------------------------------------------------------------------------- the merge

@pytest.mark.parametrize('forward_first', [False, True])   # bitsandbytes repacks CPU weights at their first forward
def test_merge_equals_4bit_path_embedded(world, forward_first, capsys):
    "Greedy replies of the merged copy agree with the 4-bit model + adapter on >= 95% of prompts (the real-class embedded model)."
    v = load_vlm('embedded', quant='4bit'); v.model = add_adapter(v.model)
    jobs, cfg = jobs_for(world), GenConfig(max_new_tokens=80, batch_size=40)
    b = F.on_device(v, v.encode([world[0].image], [chat(prompt_text(world[0], 'positive'))]))
    if forward_first:
        with torch.no_grad(): v.model(**b)
    with torch.no_grad(): ref = v.model(**b).logits
    r4 = reply_jobs(v, jobs, cfg) if forward_first else None
    m = F.merge_16bit(v)
    assert n4(m.model) == 0 and type(m.model).__name__ == 'LlavaForConditionalGeneration' and m.model.dtype == torch.float32
    assert not getattr(m.model, 'is_loaded_in_4bit', False) and not hasattr(m.model.config, 'quantization_config')
    assert not any('lora_' in n for n, _ in m.model.named_parameters())
    with torch.no_grad(): assert close(m.model(**b).logits, ref)
    if forward_first:
        r16 = reply_jobs(m, jobs, cfg)
        diff = [(a.text, c.text) for a, c in zip(r4, r16) if a != c]
        with capsys.disabled(): print(f"\nmerged vs 4-bit: {len(jobs) - len(diff)}/{len(jobs)} identical", *diff[:3], sep='\n')
        assert len(diff) <= 0.05*len(jobs), diff

@pytest.mark.parametrize('kind', ['llava', 'qwen'])
def test_merge_tiny_real_classes(kind, request, tmp_path):
    "A saved adapter loaded on a 4-bit tiny model of the real class, merged: same logits, greedy replies agree."
    from PIL import Image
    src = request.getfixturevalue(f'{kind}_dir')
    d = tiny_model(src, tmp_path/kind)
    v = load_vlm(d, quant='4bit'); add_adapter(v.model).save_pretrained(tmp_path/'adapter')
    w = load_vlm(d, quant='4bit', adapter=tmp_path/'adapter')
    imgs = [Image.new('RGB', (64 + 16*i, 64), (40*i, 90, 200)) for i in range(6)]
    msgs = [chat(f'describe picture {i} in {"a few" if i % 2 else "many"} words.') for i in range(6)]
    b = F.on_device(w, w.encode(imgs[:2], msgs[:2]))
    cfg = GenConfig(max_new_tokens=12)
    with torch.no_grad(): ref = w.model(**b).logits
    r4 = generate_batch(w, imgs, msgs, cfg)
    m = F.merge_16bit(w)
    with torch.no_grad(): assert close(m.model(**b).logits, ref)
    r16 = generate_batch(m, imgs, msgs, cfg)
    assert sum(a == c for a, c in zip(r4, r16)) >= 0.95*len(r4), list(zip(r4, r16))

def test_merge_frees_the_4bit_layers_and_the_copy():
    v = load_vlm('embedded', quant='4bit'); v.model = add_adapter(v.model)
    layers = [weakref.ref(m) for m in v.model.modules() if type(m).__name__ == 'Linear4bit']
    lora = [weakref.ref(m) for m in v.model.modules() if hasattr(m, 'lora_A')]
    m = F.merge_16bit(v); del v; gc.collect()
    assert layers and lora and all(r() is None for r in layers + lora)
    copy = weakref.ref(m.model); del m; gc.collect()
    assert copy() is None

def test_merge_of_a_plain_4bit_base():
    "Round 1 generates with the base: no adapter, every 4-bit layer dequantized."
    v = load_vlm('embedded', quant='4bit'); base = load_vlm('embedded')
    m = F.merge_16bit(v)
    assert n4(m.model) == 0
    w, w0 = m.model.model.language_model.layers[0].mlp.up_proj.weight, base.model.model.language_model.layers[0].mlp.up_proj.weight
    assert w.shape == w0.shape and ((w - w0).norm()/w0.norm()).item() < 0.15   # NF4 rounding of the original weight (~10%)

# --------------------------------------------------------------------------- the loop's hook

class FakeRun:
    "What `generation_model` uses of `stl_nb.loop.Run`: its config, the model in memory and `model(adapter)`."
    def __init__(self, quant='4bit'):
        self.cfg = NS(quant=quant, gen=GenConfig(batch_size=8), eval_gen=GenConfig(batch_size=16))
        self.vlm, self.in_memory, self.progress, self.loads = None, None, False, []
    def model(self, adapter=None):
        if self.in_memory != ('model', adapter):
            self.vlm, self.in_memory = load_vlm('embedded', quant=self.cfg.quant), ('model', adapter); self.loads.append(adapter)
        return self.vlm

def test_hook_falls_back_without_a_gpu():
    r = FakeRun()
    v, replies = F.generation_model(r, None)
    assert replies is None and n4(v.model) > 0 and r.in_memory == ('model', None)       # today's path, the 4-bit model kept

def test_hook_merges_when_the_plan_allows(monkeypatch):
    monkeypatch.setattr(F, 'gpu_bytes', lambda: 80e9)
    r = FakeRun()
    v, replies = F.generation_model(r, None)
    assert replies is None and n4(v.model) == 0 and r.in_memory == ('merged', None) and r.vlm is v
    assert F.generation_model(r, None)[0] is v and r.loads == [None]     # the same adapter: the copy is reused
    gone = weakref.ref(v.model); del v
    t = r.model(None)                                                    # training asks for the base: a fresh 4-bit load
    gc.collect()
    assert n4(t.model) > 0 and r.loads == [None, None] and gone() is None
    assert F.generation_model(FakeRun(quant=None), None)[0].model.dtype == torch.float32   # not 4-bit: as loaded

# --------------------------------------------------------------------------- length sorting

def J(sid, kind='positive', wrong=None):
    from stl_nb.data import Sample
    return Job(Sample(sid, None, 'q', ['a', 'b', 'c'], 0), kind, wrong)

def test_by_length_keeps_questions_together_and_is_stable():
    jobs = [J('a'), J('b', 'negative', 0), J('b', 'negative', 2), J('c'), J('d'), J('e')]
    L = [30, 10, 50, 20, 20, 5]
    assert [j.key for j in F.by_length(jobs, L)] == [j.key for j in (jobs[5], jobs[3], jobs[4], jobs[0], jobs[1], jobs[2])]
    assert F.padding(jobs, L, 2) == 40                 # batches [a] [b b] [c d] [e]: b's 10 padded to 50
    assert F.padding(jobs, L, 2, sort=True) == 15 + 10 + 40   # [e c] [d a] [b b]: sorting cannot help a question's own spread
    many = [J(str(i)) for i in range(64)]; lm = [(37*i) % 101 for i in range(64)]
    assert F.padding(many, lm, 8, sort=True) < F.padding(many, lm, 8)/5
    assert F.by_length([], []) == [] and F.padding([], [], 4) == 0

def test_run_sorted_keeps_record_order_and_replies(world, tmp_path):
    vlm = load_vlm('embedded')
    jobs = [Job(s, k) for s in world[:10] for k in ('positive', 'direct')]
    cfg = GenConfig(max_new_tokens=24, batch_size=6)
    recs = F.run_sorted(vlm, jobs, tmp_path/'sorted.jsonl', cfg, progress=False)
    ref = run_jobs(vlm, jobs, tmp_path/'plain.jsonl', cfg, progress=False)
    assert [(r['id'], r['kind']) for r in recs] == [(j.sample.id, j.kind) for j in jobs]
    assert [r['raw'] for r in recs] == [r['raw'] for r in ref]
    assert F.run_sorted(vlm, jobs, tmp_path/'sorted.jsonl', cfg, progress=False) == recs   # resumed: nothing new, same order

# --------------------------------------------------------------------------- compaction

@pytest.mark.parametrize('max_new', [1, 7, 80])
def test_compact_equals_generate_greedy(world, max_new):
    vlm = load_vlm('embedded'); style = style_of(vlm)
    js = [Job(s, k) for s in world[:6] for k in ('positive', 'direct')]
    imgs, msgs = [j.sample.image for j in js], [chat(prompt_text(j.sample, j.kind, None, style)) for j in js]
    cfg, st = GenConfig(max_new_tokens=max_new), {}
    assert F.generate_compact(vlm, imgs, msgs, cfg, stats=st) == generate_batch(vlm, imgs, msgs, cfg)
    assert st['row_steps'] <= st['full_steps']
    if max_new == 80: assert st['row_steps'] < st['full_steps']          # direct answers end early and leave the batch

def test_compact_sampling_is_seeded(world):
    vlm = load_vlm('embedded')
    js, cfg = jobs_for(world[:8]), GenConfig(max_new_tokens=40, temperature=1.5, top_p=1.0)   # hot enough that two seeds differ
    a, b, c = (F.reply_compact(vlm, js, cfg, s) for s in (1, 1, 2))
    assert a == b and a != c and all(r.n_tokens <= 40 for r in a)
