#!/usr/bin/env python
"""QLoRA memory and speed of a LLaVA-1.5-7B-shaped model with random weights, in one process (a GPU check for stl_nb).

Weights do not change speed or memory, so none are downloaded: the model is built from the LLaVA-1.5 config in the shared
fixtures (`--fixture`), directly on the device in bf16, then its language model is quantized to 4-bit NF4 (double
quantization, bf16 compute), the vision tower, projector and lm_head kept 16-bit as `stl_nb.models.bnb_config` does.
It measures, each in turn and each guarded (a failure is recorded and the next measurement still runs):

  fastgen     (chapter 06c, issue 17) a fresh model with a LoRA adapter: today's 4-bit path at `--fast-base-batch`, then the
              same model merged into one 16-bit copy (`stl_nb.fastgen.merge_model`) at each `--fast-batch`, every one over
              `--fast-prompts` prompts of mixed text length in job order and sorted by length: new tokens/s, peak memory,
              pad tokens, and the fraction of the bandwidth bound (batch × bandwidth / weight bytes tokens/s);
              `--fast-options` adds eager attention, a static cache and torch.compile at the best batch
  generation  samples/s of greedy `generate` with `--new-tokens` fixed-length replies (EOS suppressed):
              one prompt per call vs batches of `--gen-batch` prompts; each prompt is 1 + 576 image + 40 text tokens
  training    one QLoRA step (peft LoRA r=128, alpha=256 on every linear layer of the language model, gradient
              checkpointing, AdamW, bf16 autocast) at batch 1 and 4 of 576 image + 256 text tokens:
              peak memory (`torch.cuda.max_memory_allocated`, reset before each) and training tokens/s

Without bitsandbytes it says so and still runs everything in bf16 (the report's `quant` reads 'bf16 (...)').
`--tiny` shrinks the same config (hidden sizes, layers) to run on a CPU in seconds: the test that keeps this script working.

    python bench/gpu_check.py --fixture ../shared/fixtures/llava-1.5-7b-hf --out gpu_check.json
    python bench/gpu_check.py --tiny --new-tokens 16 --out /tmp/tiny.json     # CPU, ~30 s
    python bench/gpu_check.py --skip generate train --fast-options --out bench/results/gpu_check-fastgen.json   # issue 17 only
"""
import argparse, gc, json, os, platform, resource, sys, tempfile, time, traceback
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2]/'shared'/'fixtures'/'llava-1.5-7b-hf'
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--fixture', default=str(FIXTURE), help='folder holding the LLaVA-1.5 config.json (and processor files)')
    p.add_argument('--out', default='gpu_check.json', help='where to write the report as JSON')
    p.add_argument('--tiny', action='store_true', help='shrink hidden sizes and layers (CPU smoke run)')
    p.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: cuda when available)")
    p.add_argument('--no-4bit', action='store_true', help='keep the model in 16-bit (LoRA instead of QLoRA)')
    p.add_argument('--quant-path', choices=('swap', 'disk'), default='swap',
                   help="swap: replace nn.Linear by bnb Linear4bit in place (seconds); disk: save a random checkpoint to "
                        "a temp folder and reload it with from_pretrained(quantization_config=...). swap falls back to disk on error")
    p.add_argument('--train-batch', type=int, nargs='+', default=[1, 4])
    p.add_argument('--text-tokens', type=int, default=256, help='text tokens per training example (besides the image tokens)')
    p.add_argument('--train-steps', type=int, default=3, help='timed training steps per batch size (after one warm-up step)')
    p.add_argument('--lora-r', type=int, default=128)
    p.add_argument('--lora-alpha', type=int, default=256)
    p.add_argument('--new-tokens', type=int, default=128, help='generated tokens per reply')
    p.add_argument('--gen-batch', type=int, nargs='+', default=[8, 16], help='batch sizes of batched generation')
    p.add_argument('--gen-single', type=int, default=4, help='prompts generated one at a time (the baseline)')
    p.add_argument('--skip', nargs='*', default=[], choices=('generate', 'train', 'fastgen'))
    p.add_argument('--fast-batch', type=int, nargs='+', default=[16, 64, 128], help='fastgen: batches of the merged 16-bit copy')
    p.add_argument('--fast-base-batch', type=int, default=16, help="fastgen: the batch of today's 4-bit path")
    p.add_argument('--fast-prompts', type=int, default=128, help='fastgen: prompts per measurement (at least the largest batch)')
    p.add_argument('--fast-text', type=int, nargs=2, default=[20, 300], help='fastgen: text tokens per prompt, drawn from lo..hi')
    p.add_argument('--fast-options', action='store_true', help='fastgen: also eager attention, static cache, torch.compile at the best batch')
    p.add_argument('--bandwidth', type=float, default=None, help='memory bandwidth in TB/s (default: by GPU name)')
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------- environment and memory

def versions() -> dict:
    import importlib.metadata as md
    out = {'python': platform.python_version()}
    for k in ('torch', 'transformers', 'peft', 'accelerate', 'bitsandbytes'):
        try: out[k] = md.version(k)
        except md.PackageNotFoundError: out[k] = None
    return out

def machine(device) -> dict:
    import torch
    m = {'host': platform.node(), 'cpu': platform.processor() or platform.machine(), 'cpu_cores': os.cpu_count(),
         'torch_threads': torch.get_num_threads(), 'device': str(device)}
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        m.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=round(p.total_memory/2**30, 1),
                 capability='.'.join(map(str, torch.cuda.get_device_capability(device))), cuda=torch.version.cuda)
    return m

def load_bnb():
    "bitsandbytes, or None with the reason (it is imported only here, so the script runs without it)."
    try:
        import bitsandbytes as bnb
        return bnb, None
    except Exception as e:  # ImportError, or a wheel that does not match the CUDA/torch here
        return None, f"{type(e).__name__}: {e}"

class Peak:
    "Peak memory over a block: `torch.cuda.max_memory_allocated` (reset on entry) on a GPU, process peak RSS on a CPU."
    def __init__(self, device): self.device = device
    def __enter__(self):
        import torch
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else: self.before = rss_peak()
        self.t0 = time.perf_counter()
        return self
    def __exit__(self, *exc):
        import torch
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else: self.peak = rss_peak()
        self.seconds = time.perf_counter() - self.t0

def rss_peak() -> int:
    "Peak resident memory of this process in bytes (Linux reports KiB)."
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == 'darwin' else r*1024

def gib(b): return None if b is None else round(b/2**30, 3)


# ---------------------------------------------------------------- the model

def llava_config(fixture, tiny=False):
    "The LLaVA-1.5 config of the fixture, shrunk by `TINY_*` when `tiny` (vocabulary and 576 image tokens kept)."
    from transformers import AutoConfig
    if not (Path(fixture)/'config.json').exists(): raise FileNotFoundError(f"no config.json in --fixture {fixture}")
    cfg = AutoConfig.from_pretrained(fixture)
    if tiny:
        for k, v in TINY_TEXT.items(): setattr(cfg.text_config, k, v)
        for k, v in TINY_VISION.items(): setattr(cfg.vision_config, k, v)
    return cfg

def n_image_tokens(cfg) -> int:
    v = cfg.vision_config
    return (v.image_size//v.patch_size)**2 + (cfg.vision_feature_select_strategy == 'full')

def build_model(cfg, device, dtype):
    "A random-weight model of `cfg`, created directly on `device` in `dtype` (no CPU init of 7B parameters)."
    import torch
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device): model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights never stop anyway; fixed-length replies need no EOS
    return model.eval()

def keep_16bit(model) -> list:
    "Full paths of the modules 4-bit loading skips: vision tower, projector (everything but the language model) and lm_head."
    inner = model.model
    return [f'model.{n}' for n, _ in inner.named_children() if n != 'language_model'] + \
           [n for n, _ in model.named_children() if n != 'model']

def bnb_config(compute_dtype, skip):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)

def quantize_swap(model, bnb, device, compute_dtype, skip) -> int:
    "Replace each nn.Linear outside `skip` by a bnb Linear4bit holding its weight, quantized on `device`; returns how many."
    import inspect, torch, torch.nn as nn
    takes_module = 'module' in inspect.signature(bnb.nn.Params4bit.__new__).parameters
    skipped = lambda n: any(n == s or n.startswith(s + '.') for s in skip)
    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(n)]
    for name, lin in todo:
        parent_name, _, child = name.rpartition('.')
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type='nf4', device='meta')
        kw = dict(module=q) if takes_module else {}
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True, quant_type='nf4',
                                     quant_storage=torch.uint8, **kw).to(device)   # .to() quantizes
        if not takes_module: q.quant_state = q.weight.quant_state
        if lin.bias is not None: q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        setattr(model.get_submodule(parent_name), child, q)
        del lin
    model.is_loaded_in_4bit = True            # what peft reads to wrap Linear4bit with its 4-bit LoRA layer
    model.quantization_method = 'bitsandbytes'
    return len(todo)

def quantize_disk(model, device, compute_dtype, skip):
    "Save `model` to a temp folder, reload it 4-bit with from_pretrained (the path `stl_nb.models.load_vlm` takes)."
    import shutil, torch
    from transformers import LlavaForConditionalGeneration
    d = Path(tempfile.mkdtemp(prefix='gpu-check-'))
    try:
        t0 = time.perf_counter(); model.save_pretrained(d); t_save = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in d.rglob('*') if f.is_file())
        del model; gc.collect()
        if device.type == 'cuda': torch.cuda.empty_cache()
        t0 = time.perf_counter()
        q = LlavaForConditionalGeneration.from_pretrained(d, quantization_config=bnb_config(compute_dtype, skip),
                                                          dtype=compute_dtype, device_map={'': str(device)})
        t_load = time.perf_counter() - t0
    finally: shutil.rmtree(d, ignore_errors=True)
    q.generation_config.eos_token_id = None
    return q.eval(), {'checkpoint_gb': gib(size), 'save_s': round(t_save, 2), 'load_4bit_s': round(t_load, 2)}

def count_4bit(model, bnb) -> int:
    return 0 if bnb is None else sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


# ---------------------------------------------------------------- inputs

def batch(cfg, bs, n_text, device, dtype, labels=False, seed=0):
    "`bs` rows of bos + the image tokens + `n_text` - 1 random text tokens, random pixels; labels on the text when `labels`."
    import torch
    g = torch.Generator().manual_seed(seed)
    n_img, img_id = n_image_tokens(cfg), cfg.image_token_index
    text = torch.randint(3, min(img_id, cfg.text_config.vocab_size), (bs, n_text - 1), generator=g)
    ids = torch.cat([torch.ones(bs, 1, dtype=torch.long), torch.full((bs, n_img), img_id), text], 1)
    v = cfg.vision_config
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
               pixel_values=torch.randn(bs, 3, v.image_size, v.image_size, generator=g).to(dtype))
    if labels:
        lab = ids.clone(); lab[:, :1 + n_img] = -100; out['labels'] = lab
    return {k: t.to(device) for k, t in out.items()}


# ---------------------------------------------------------------- measurements

def sync(device):
    import torch
    if device.type == 'cuda': torch.cuda.synchronize()

def gen_rate(model, cfg, a, device, dtype, bs, n_prompts) -> dict:
    "Samples/s of greedy generation of `n_prompts` prompts in batches of `bs`, every reply exactly `a.new_tokens` long."
    import torch
    from transformers import GenerationConfig
    gc_ = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=cfg.pad_token_id)
    def run(n):
        b = batch(cfg, n, 41, device, dtype, seed=n)
        with torch.inference_mode(): out = model.generate(**b, generation_config=gc_)
        return out.shape[1] - b['input_ids'].shape[1]
    run(bs); sync(device)                                            # warm-up (kernels, cache allocator)
    with Peak(device) as pk:
        lens = [run(bs) for _ in range(max(1, n_prompts//bs))]
    n = bs*len(lens)
    return {'batch_size': bs, 'prompts': n, 'new_tokens_per_reply': lens, 'seconds': round(pk.seconds, 3),
            'samples_per_s': round(n/pk.seconds, 3), 'new_tokens_per_s': round(n*a.new_tokens/pk.seconds, 1),
            'peak_gb': gib(pk.peak)}

def measure_generation(model, cfg, a, device, dtype) -> dict:
    one = gen_rate(model, cfg, a, device, dtype, 1, a.gen_single)
    res = {'one_at_a_time': one}
    for bs in a.gen_batch:
        r = gen_rate(model, cfg, a, device, dtype, bs, bs)
        r['speedup_vs_one'] = round(r['samples_per_s']/one['samples_per_s'], 2)
        res[f'batch_{bs}'] = r
    return res

def lora_targets(model) -> str:
    "A regex matching every linear layer inside the language model (as `stl_nb.train.lora_targets`)."
    import torch.nn as nn
    names = {n.split('.')[-1] for n, m in model.named_modules() if 'language_model' in n and isinstance(m, nn.Linear)}
    return r'.*language_model.*\.(' + '|'.join(sorted(names)) + r')$'

GC_KW = {'use_reentrant': False}  # explicit: torch warns when it is not given

def add_lora(model, a, quantized):
    "peft LoRA on the language model's linear layers, prepared as `stl_nb.train.train_qlora` does (gradient checkpointing)."
    import warnings
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if quantized:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=GC_KW)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KW); model.enable_input_require_grads()
    lc = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.05, target_modules=lora_targets(model),
                    bias='none', task_type='CAUSAL_LM')
    model = get_peft_model(model, lc)
    model.train()
    return model

def train_step(model, opt, b, device):
    import torch, contextlib
    ctx = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else contextlib.nullcontext()
    with ctx: loss = model(**b).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return loss.item()

def measure_training(model, cfg, a, device, dtype, quantized) -> dict:
    import torch
    model = add_lora(model, a, quantized)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_kind = sorted({type(m).__module__ + '.' + type(m).__name__ for n, m in model.named_modules() if hasattr(m, 'lora_A')})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    res = {'lora_r': a.lora_r, 'lora_alpha': a.lora_alpha, 'trainable_params_m': round(trainable/1e6, 2),
           'lora_layer_types': lora_kind, 'gradient_checkpointing': True,
           'tokens_per_example': n_image_tokens(cfg) + a.text_tokens}
    for bs in a.train_batch:
        r = {}
        try:
            b = batch(cfg, bs, a.text_tokens, device, dtype, labels=True, seed=bs)
            with Peak(device) as warm: loss = train_step(model, opt, b, device)   # the first step also creates Adam's state
            with Peak(device) as pk:
                losses = [train_step(model, opt, b, device) for _ in range(a.train_steps)]
            toks = bs*b['input_ids'].shape[1]*a.train_steps
            r = {'batch_size': bs, 'seq_len': b['input_ids'].shape[1], 'steps': a.train_steps,
                 'step_s': round(pk.seconds/a.train_steps, 3), 'tokens_per_s': round(toks/pk.seconds, 1),
                 'peak_gb': gib(max(pk.peak, warm.peak)), 'peak_first_step_gb': gib(warm.peak),
                 'allocated_before_gb': gib(warm.before), 'losses': [round(x, 4) for x in [loss, *losses]]}
            if any(x != x for x in r['losses']): r['warning'] = 'NaN loss (random weights); timings still valid'
        except Exception as e:
            r = {'batch_size': bs, 'error': f"{type(e).__name__}: {str(e)[:500]}"}
            traceback.print_exc()
        res[f'batch_{bs}'] = r
        b = None; gc.collect()
        if device.type == 'cuda': torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- fast generation (chapter 06c)

BANDWIDTH = {'H200': 4.8e12, 'H100': 3.35e12, 'A100-SXM4-80GB': 2.04e12, 'A100': 1.555e12, 'L40S': 0.864e12, 'A10G': 0.6e12,
             'L4': 0.3e12, 'T4': 0.32e12}   # bytes/s of HBM/GDDR by the device name's first match (`--bandwidth` overrides)

def bandwidth(device, given=None):
    "Memory bandwidth in bytes/s: `--bandwidth` (TB/s), else by the GPU's name, else None (a CPU)."
    import torch
    if given: return given*1e12
    if device.type != 'cuda': return None
    name = torch.cuda.get_device_name(device)
    return next((b for k, b in BANDWIDTH.items() if k in name), None)

def mixed_prompts(cfg, n, device, dtype, lo, hi, seed=0):
    "`n` prompts of bos + image tokens + a random number (lo..hi) of text tokens: (list of id rows, pixels)."
    import torch
    g = torch.Generator().manual_seed(seed)
    n_img, img_id = n_image_tokens(cfg), cfg.image_token_index
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    rows = [[1] + [img_id]*n_img + torch.randint(3, min(img_id, cfg.text_config.vocab_size), (l,), generator=g).tolist() for l in lens]
    v = cfg.vision_config
    return rows, torch.randn(n, 3, v.image_size, v.image_size, generator=g).to(dtype)

def fast_rate(model, cfg, a, device, rows, pixels, bs, sort, weight_bytes, bw, **gen_kw) -> dict:
    "Tokens/s and peak memory of greedy generation of `rows` in batches of `bs` (left-padded; `sort`: by length first)."
    import torch
    from transformers import GenerationConfig
    gcfg = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=cfg.pad_token_id or 0, **gen_kw)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if sort else list(range(len(rows)))
    def run(idx):
        L = max(len(rows[i]) for i in idx)
        ids = torch.tensor([[0]*(L - len(rows[i])) + rows[i] for i in idx], device=device)
        mask = torch.tensor([[0]*(L - len(rows[i])) + [1]*len(rows[i]) for i in idx], device=device)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels[idx].to(device), generation_config=gcfg)
        return L*len(idx) - sum(len(rows[i]) for i in idx)
    run(order[:bs]); sync(device)                                        # warm-up (kernels, allocator, compile)
    with Peak(device) as pk: pads = sum(run(order[i:i + bs]) for i in range(0, len(order), bs))
    tps = len(rows)*a.new_tokens/pk.seconds
    bound = bs*bw/weight_bytes if bw else None                           # one decode step reads every weight once
    return {'batch_size': bs, 'sorted': sort, 'prompts': len(rows), 'pad_tokens': pads, 'seconds': round(pk.seconds, 3),
            'new_tokens_per_s': round(tps, 1), 'peak_gb': gib(pk.peak),
            'bound_tokens_per_s': bound and round(bound, 1), 'fraction_of_bound': bound and round(tps/bound, 3)}

def measure_fastgen(cfg, a, device, dtype, bnb) -> dict:
    "Today's 4-bit path with a LoRA adapter against the merged 16-bit copy (`stl_nb.fastgen.merge_model`), at several batches, unsorted and sorted."
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stl_nb.fastgen import merge_model
    from peft import LoraConfig, get_peft_model
    model = build_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if bnb is not None: quantize_swap(model, bnb, device, dtype, keep_16bit(model))
    w4 = sum(p.numel()*p.element_size() for p in model.parameters())   # the stored (packed) bytes
    model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, target_modules=lora_targets(model),
                                             init_lora_weights=False)).eval()
    bw, w16 = bandwidth(device, a.bandwidth), n_params*torch.finfo(dtype).bits//8   # the merged copy, in `dtype` (bf16 on a GPU)
    rows, pixels = mixed_prompts(cfg, a.fast_prompts, device, dtype, *a.fast_text)
    res = {'bandwidth_tb_s': bw and bw/1e12, 'weights_4bit_gb': gib(w4), 'weights_16bit_gb': gib(w16),
           'new_tokens': a.new_tokens, 'text_tokens': a.fast_text, 'runs': []}
    def measure(label, m, bs, sort, wbytes, **kw):
        try: r = {'path': label, **fast_rate(m, cfg, a, device, rows, pixels, bs, sort, wbytes, bw, **kw)}
        except Exception as e:
            traceback.print_exc(); r = {'path': label, 'batch_size': bs, 'sorted': sort, 'error': f"{type(e).__name__}: {str(e)[:300]}"}
        print('  ', fast_line(r), flush=True); res['runs'].append(r)
        gc.collect()
        if device.type == 'cuda': torch.cuda.empty_cache()
        return r
    q = '4-bit+LoRA' if bnb is not None else f'{str(dtype)[6:]}+LoRA'
    for sort in (False, True): measure(q, model, a.fast_base_batch, sort, w4)
    with Peak(device) as pk: model = merge_model(model, dtype)
    gc.collect()
    if device.type == 'cuda': torch.cuda.empty_cache()
    res.update(merge_s=round(pk.seconds, 2), merge_peak_gb=gib(pk.peak), after_merge_gb=gib(torch.cuda.memory_allocated(device))
               if device.type == 'cuda' else None, linear4bit_left=sum(type(m).__name__ == 'Linear4bit' for m in model.modules()))
    for bs in a.fast_batch:
        for sort in (False, True): measure('merged 16-bit', model, bs, sort, w16)
    if a.fast_options:
        ok = [r for r in res['runs'] if r['path'] == 'merged 16-bit' and 'error' not in r]
        best = max(ok, key=lambda r: r['new_tokens_per_s'])['batch_size'] if ok else a.fast_batch[0]
        try:
            model.set_attn_implementation('eager'); measure('merged, eager attention', model, best, True, w16)
            model.set_attn_implementation('sdpa')
        except Exception as e: res['runs'].append({'path': 'merged, eager attention', 'error': f"{type(e).__name__}: {e}"})
        measure('merged, static cache', model, best, True, w16, cache_implementation='static')
        try:
            model.forward = torch.compile(model.forward, mode='reduce-overhead', dynamic=False)
            measure('merged, static cache + torch.compile', model, best, True, w16, cache_implementation='static')
        except Exception as e: res['runs'].append({'path': 'merged, torch.compile', 'error': f"{type(e).__name__}: {e}"})
    base = next((r for r in res['runs'] if r['path'] == q and not r['sorted'] and 'error' not in r), None)
    for r in res['runs']:
        if base and 'error' not in r: r['speedup_vs_4bit'] = round(r['new_tokens_per_s']/base['new_tokens_per_s'], 2)
    return res

def fast_line(r) -> str:
    if 'error' in r: return f"{r['path']:<38} batch {r['batch_size']:>3} {'sorted' if r['sorted'] else 'job order':<9} ERROR {r['error']}"
    b = '' if r['fraction_of_bound'] is None else f"  {100*r['fraction_of_bound']:5.1f}% of {r['bound_tokens_per_s']:.0f} bound"
    s = f"  ×{r['speedup_vs_4bit']} vs 4-bit" if 'speedup_vs_4bit' in r else ''
    return (f"{r['path']:<38} batch {r['batch_size']:>3} {'sorted' if r['sorted'] else 'job order':<9} {r['new_tokens_per_s']:9.1f} tok/s"
            f"  peak {r['peak_gb']} GB  pad {r['pad_tokens']}{b}{s}")


# ---------------------------------------------------------------- report

def table(rep) -> str:
    m, v = rep['machine'], rep['versions']
    lines = [f"gpu_check {rep['date']}  {m.get('gpu', m['cpu'])}  ({m.get('gpu_memory_gb', '-')} GB, cuda {m.get('cuda', '-')})",
             '  ' + '  '.join(f"{k} {v[k]}" for k in v),
             f"model: {rep['model']['name']}  {rep['model'].get('params_b', '?')}B params  quant: {rep['quant']}"]
    mod = rep['model']
    if 'build_s' in mod:
        lines.append(f"  built in {mod['build_s']}s, quantized in {mod.get('quantize_s', '-')}s "
                     f"({mod.get('linear4bit', 0)} Linear4bit); weights {mod.get('weights_gb')} GB")
    g = rep.get('generation', {})
    if 'one_at_a_time' in g:
        lines.append(f"generation ({rep['args']['new_tokens']} new tokens, greedy, EOS off):")
        for k, r in g.items():
            if isinstance(r, dict) and 'samples_per_s' in r:
                lines.append(f"  {k:<14} {r['samples_per_s']:8.3f} samples/s  {r['new_tokens_per_s']:9.1f} tok/s"
                             f"  peak {r['peak_gb']} GB" + (f"  ×{r['speedup_vs_one']} vs one" if 'speedup_vs_one' in r else ''))
    t = rep.get('training', {})
    if t:
        lines.append(f"training (LoRA r={t.get('lora_r')}, {t.get('trainable_params_m')}M trainable, grad ckpt, AdamW, "
                     f"{t.get('tokens_per_example')} tokens/example):")
        for k, r in t.items():
            if k.startswith('batch_'):
                lines.append(f"  {k:<14} " + (f"ERROR {r['error']}" if 'error' in r else
                             f"peak {r['peak_gb']:7.2f} GB  {r['tokens_per_s']:9.1f} tokens/s  {r['step_s']} s/step"))
    f = rep.get('fastgen', {})
    if f.get('runs'):
        lines.append(f"fast generation ({f['new_tokens']} new tokens, greedy, EOS off, text {f['text_tokens'][0]}..{f['text_tokens'][1]} tokens; "
                     f"weights 4-bit {f['weights_4bit_gb']} GiB, 16-bit {f['weights_16bit_gb']} GiB; bandwidth {f['bandwidth_tb_s']} TB/s; "
                     f"merged in {f.get('merge_s')} s, {f.get('linear4bit_left')} Linear4bit left):")
        lines += ['  ' + fast_line(r) for r in f['runs']]
    for e in rep['errors']: lines.append(f"ERROR {e}")
    for w in rep['warnings']: lines.append(f"WARNING {w}")
    lines.append(f"total {rep['total_s']} s")
    return '\n'.join(lines)

def main(argv=None):
    a = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    import torch
    torch.manual_seed(a.seed)
    device = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    rep = {'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'args': vars(a), 'versions': versions(), 'machine': machine(device),
           'model': {'name': ('tiny ' if a.tiny else '') + 'LLaVA-1.5-7B architecture, random weights'},
           'quant': None, 'errors': [], 'warnings': []}
    bnb, why = (None, 'disabled by --no-4bit') if a.no_4bit else load_bnb()
    if bnb is None and not a.no_4bit:
        msg = f"bitsandbytes is not importable ({why}): measuring {str(dtype)[6:]} LoRA instead of 4-bit QLoRA"
        print('!'*8, msg, '!'*8, flush=True); rep['warnings'].append(msg)
    rep['quant'] = f'nf4 (double quant, {str(dtype)[6:]} compute)' if bnb else f'{str(dtype)[6:]} ({why})'
    out = Path(a.out)
    def save():
        rep['total_s'] = round(time.perf_counter() - t_start, 1)
        out.parent.mkdir(parents=True, exist_ok=True); out.write_text(json.dumps(rep, indent=1, default=str))
    model = None
    try:
        cfg = llava_config(a.fixture, a.tiny)
        with Peak(device) as pk: model = build_model(cfg, device, dtype)
        rep['model'].update(params_b=round(sum(p.numel() for p in model.parameters())/1e9, 3), build_s=round(pk.seconds, 2),
                            image_tokens=n_image_tokens(cfg), dtype=str(dtype))
        print(f"built {rep['model']['params_b']}B params on {device} in {pk.seconds:.1f}s", flush=True)
        if bnb is not None:
            skip = keep_16bit(model); rep['model']['kept_16bit'] = skip
            t0 = time.perf_counter()
            try:
                if a.quant_path != 'swap': raise RuntimeError('--quant-path disk')
                quantize_swap(model, bnb, device, dtype, skip); rep['model']['quant_path'] = 'swap'
            except Exception as e:
                if a.quant_path == 'swap':
                    traceback.print_exc(); rep['warnings'].append(f"in-place 4-bit swap failed ({type(e).__name__}: {e}); reloading from disk")
                    model = build_model(cfg, device, dtype)   # the swap may have left it half-converted
                model, info = quantize_disk(model, device, dtype, skip); rep['model'].update(quant_path='disk', **info)
            gc.collect()
            if device.type == 'cuda': torch.cuda.synchronize(); torch.cuda.empty_cache()
            rep['model']['quantize_s'] = round(time.perf_counter() - t0, 2)
            rep['model']['linear4bit'] = count_4bit(model, bnb)
            print(f"quantized {rep['model']['linear4bit']} linear layers to NF4 in {rep['model']['quantize_s']}s ({rep['model']['quant_path']})", flush=True)
        rep['model']['weights_gb'] = gib(torch.cuda.memory_allocated(device) if device.type == 'cuda' else
                                        sum(p.numel()*p.element_size() for p in model.parameters()))
    except Exception as e:
        traceback.print_exc(); rep['errors'].append(f"model: {type(e).__name__}: {str(e)[:500]}")
        save(); print(table(rep)); return rep
    for part, fn in (('generation', lambda: measure_generation(model, cfg, a, device, dtype)),
                     ('training', lambda: measure_training(model, cfg, a, device, dtype, bnb is not None)),
                     ('fastgen', lambda: measure_fastgen(cfg, a, device, dtype, bnb))):
        if part[:5] in {s[:5] for s in a.skip}: continue
        if part == 'fastgen':                  # it builds its own model: free the other first
            model = None; gc.collect()
            if device.type == 'cuda': torch.cuda.empty_cache()
        print(f"measuring {part} ...", flush=True)
        try: rep[part] = fn()
        except Exception as e:
            traceback.print_exc(); rep['errors'].append(f"{part}: {type(e).__name__}: {str(e)[:500]}")
        save()
    save()
    print(table(rep), flush=True)
    print(f"report written to {out}")
    return rep


if __name__ == '__main__': main()
