"""stl_nb.models on the real LLaVA-1.5 and Qwen2.5-VL processors and on tiny random models of their real classes.

The tiny models are built from the real 7B configs with every size shrunk (language model hidden size 64, the smallest that
4-bit layers take; a one-layer vision tower), saved with the real processor, and loaded back through `load_vlm`."""
import shutil, subprocess, sys, warnings
import pytest, torch
from PIL import Image
import stl_nb.models as M
from stl_nb.models import VLM, load_vlm, bnb_config, plan_memory, shrunk_config, tiny_model

MSGS = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What colour is the circle?\n(A) red\n(B) blue'}]}]
SHORT = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Colour?'}]}]
TARGET = 'CAPTION: One red circle on the left.\n\nREASONING: The only circle is red.\n\nCONCLUSION: (A) red'
TARGETS = [TARGET, 'A', '(B) blue', 'CAPTION: A square.\n\nEXPLANATION: It has four equal sides, so (C) is wrong.',
           'ünï 3.5 — “quoted” 42%', 'ends with a space ', '  two leading spaces', 'line one\nline two\n']

def img(w=336, h=336, colour='white'): return Image.new('RGB', (w, h), colour)

# --------------------------------------------------------------------------- processors and tiny models

_processors, _tiny = {}, {}

def processor(path):
    from transformers import AutoProcessor
    if path not in _processors: _processors[path] = AutoProcessor.from_pretrained(path)
    return _processors[path]

@pytest.fixture
def llava(llava_dir): return VLM(None, processor(llava_dir), name='llava processor')

@pytest.fixture
def qwen(qwen_dir): return VLM(None, processor(qwen_dir), name='qwen processor')

def tiny_dir(src, kind, root):
    "A folder holding a tiny random model of the real class and the real processor (built once per session)."
    if kind not in _tiny: _tiny[kind] = tiny_model(src, root/kind)
    return _tiny[kind]

@pytest.fixture(scope='session')
def tiny_root(tmp_path_factory): return tmp_path_factory.mktemp('tiny')

@pytest.fixture
def tiny_llava(llava_dir, tiny_root): return tiny_dir(llava_dir, 'llava', tiny_root)

@pytest.fixture
def tiny_qwen(qwen_dir, tiny_root): return tiny_dir(qwen_dir, 'qwen', tiny_root)

@pytest.fixture(params=['llava', 'qwen'])
def tiny(request): return request.getfixturevalue(f'tiny_{request.param}')

# --------------------------------------------------------------------------- prompts and image tokens

def test_rendered_prompts(llava, qwen):
    assert llava.render(MSGS) == 'USER: <image>\nWhat colour is the circle?\n(A) red\n(B) blue ASSISTANT:'
    assert qwen.render(MSGS) == ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n'
                                 '<|vision_start|><|image_pad|><|vision_end|>What colour is the circle?\n(A) red\n(B) blue'
                                 '<|im_end|>\n<|im_start|>assistant\n')

def test_facts_read_from_the_processors(llava, qwen):
    assert (llava.kind, llava.image_token, llava.image_token_id, llava.end_marker, llava.eos_token_ids) == \
           ('llava', '<image>', 32000, '</s>', [2])
    assert (qwen.kind, qwen.image_token, qwen.image_token_id, qwen.end_marker, qwen.eos_token_ids) == \
           ('qwen2_5_vl', '<|image_pad|>', 151655, '<|im_end|>', [151645])

@pytest.mark.parametrize('size', [(336, 336), (500, 300), (48, 48)])
def test_llava_576_image_tokens(llava, size):
    b = llava.encode([img(*size)], [MSGS])
    assert int((b.input_ids == 32000).sum()) == 576 and b.pixel_values.shape == (1, 3, 336, 336)

def test_qwen_256_image_tokens_for_448(qwen):
    b = qwen.encode([img(448, 448)], [MSGS])
    assert int((b.input_ids == 151655).sum()) == 256 and b.image_grid_thw.tolist() == [[1, 32, 32]]

def test_qwen_pixels_capped_by_default(qwen_dir):
    v = VLM(None, M._load_processor(qwen_dir, 'qwen2_5_vl'))
    n = lambda size: int((v.encode([img(*size)], [MSGS]).input_ids == v.image_token_id).sum())
    assert n((448, 448)) == 256 and n((4000, 3000)) <= 256 and n((48, 48)) >= 64
    v = VLM(None, M._load_processor(qwen_dir, 'qwen2_5_vl', max_pixels=28*28*16))
    assert int((v.encode([img(448, 448)], [MSGS]).input_ids == v.image_token_id).sum()) <= 16
    with pytest.raises(ValueError, match='more than max_pixels'): M._load_processor(qwen_dir, 'qwen2_5_vl', min_pixels=10**6, max_pixels=10**5)

def test_pixel_caps_refused_for_fixed_size_processors(llava_dir):
    with pytest.raises(ValueError, match='Qwen2-VL-style'): M._load_processor(llava_dir, 'llava', max_pixels=448*448)

# --------------------------------------------------------------------------- labels: the chapter's invariant

@pytest.mark.parametrize('which', ['llava', 'qwen'])
@pytest.mark.parametrize('target', TARGETS)
def test_decoded_labels_are_exactly_the_target(which, target, request):
    "Decoding the label positions gives exactly the target text and the end marker, for the real LLaVA-1.5 and Qwen2.5-VL tokenizers."
    v = request.getfixturevalue(which)
    b = v.encode([img()], [MSGS], [target])
    trained = b.labels != -100
    assert v.decode(b.labels[trained], skip_special_tokens=False) == target + v.end_marker
    assert v.decode(b.labels[trained]) == target
    assert torch.equal(b.input_ids[trained], b.labels[trained])

@pytest.mark.parametrize('which', ['llava', 'qwen'])
def test_prompt_image_and_pad_are_masked(which, request):
    v = request.getfixturevalue(which)
    gen = v.encode([img()], [MSGS])                       # the generation prompt
    b = v.encode([img()], [MSGS], [TARGET])
    n_prompt = gen.input_ids.shape[1]
    assert torch.equal(b.input_ids[0, :n_prompt], gen.input_ids[0])          # training prompt == generation prompt
    assert (b.labels[0, :n_prompt] == -100).all() and (b.labels[0, n_prompt:] != -100).all()
    assert (b.labels[b.input_ids == v.image_token_id] == -100).all()
    two = v.encode([img(), img(200, 100)], [MSGS, SHORT], [TARGET, 'A'])
    assert (two.labels[two.attention_mask == 0] == -100).all()

# --------------------------------------------------------------------------- batching, padding, length

@pytest.mark.parametrize('which', ['llava', 'qwen'])
@pytest.mark.parametrize('side', ['left', 'right'])
def test_batched_encode_pads_and_matches_single_examples(which, side, request):
    v = request.getfixturevalue(which)
    images, msgs, targets = [img(), img(500, 300, 'red')], [MSGS, SHORT], [TARGET, 'CONCLUSION: (B) blue']
    b = v.encode(images, msgs, targets, padding_side=side)
    assert b.input_ids.shape == b.attention_mask.shape == b.labels.shape
    for i in range(2):
        one = v.encode(images[i:i+1], msgs[i:i+1], targets[i:i+1])
        keep = b.attention_mask[i] == 1
        assert torch.equal(b.input_ids[i][keep], one.input_ids[0]) and torch.equal(b.labels[i][keep], one.labels[0])
        pads = (~keep).nonzero().flatten().tolist()
        if pads: assert pads == (list(range(len(pads))) if side == 'left' else list(range(b.input_ids.shape[1] - len(pads), b.input_ids.shape[1])))
        assert (b.input_ids[i][~keep] == v.tokenizer.pad_token_id).all()
    short = int(b.attention_mask.sum(1).argmin())
    assert b.attention_mask[short, 0 if side == 'left' else -1] == 0   # the shorter example carries the padding

def test_max_length_shortens_the_target_never_the_prompt(llava):
    full = llava.encode([img()], [MSGS], [TARGET])
    n = full.input_ids.shape[1]
    with pytest.warns(UserWarning, match=r'1 target\(s\) shortened.*examples \[0\]'):
        b = llava.encode([img()], [MSGS], [TARGET], max_length=n - 5)
    assert b.input_ids.shape[1] == n - 5 and int((b.input_ids == 32000).sum()) == 576
    assert torch.equal(b.input_ids[0], full.input_ids[0, :n - 5])
    assert TARGET.startswith(llava.decode(b.labels[b.labels != -100])) and 2 not in b.labels.tolist()  # no eos after a cut
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        llava.encode([img()], [MSGS], [TARGET], max_length=n)   # fits exactly: no warning
    with pytest.raises(ValueError, match='never cut'): llava.encode([img()], [MSGS], [TARGET], max_length=600)

def test_encode_checks_lengths(llava):
    with pytest.raises(ValueError, match='2 images for 1'): llava.encode([img(), img()], [MSGS])
    with pytest.raises(ValueError, match='2 targets for 1'): llava.encode([img()], [MSGS], ['a', 'b'])
    with pytest.raises(ValueError, match='padding_side'): llava.encode([img()], [MSGS], padding_side='middle')

def test_decode_stops_at_end_of_turn(qwen, llava):
    ids = qwen.tokenizer('(A) red<|im_end|>junk<|endoftext|>', add_special_tokens=False).input_ids
    assert qwen.decode(ids) == '(A) red' and qwen.decode(torch.tensor([ids, ids])) == ['(A) red']*2
    assert qwen.decode(ids, skip_special_tokens=False) == '(A) red<|im_end|>'
    ids = llava.tokenizer('(A) red</s><pad><pad>', add_special_tokens=False).input_ids
    assert llava.decode(ids) == '(A) red'

def test_show_labels(llava):
    b = llava.encode([img(), img()], [MSGS, SHORT], [TARGET, 'A'])
    lines = llava.show_labels(b, 1).splitlines()
    assert lines[0].strip().startswith('masked │ [<pad>×') and '[<image>×576]' in lines[2]
    assert lines[-1] == "trained │ 'A</s>'"

# --------------------------------------------------------------------------- loading

def test_bnb_config_skips_vision_projector_head_by_full_path(llava_dir, qwen_dir):
    from transformers import AutoConfig
    q = bnb_config('float16', AutoConfig.from_pretrained(llava_dir))
    assert q.llm_int8_skip_modules == ['model.vision_tower', 'model.multi_modal_projector', 'lm_head']
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (True, 'nf4', True, torch.float16)
    assert bnb_config('bfloat16', AutoConfig.from_pretrained(qwen_dir)).llm_int8_skip_modules == ['model.visual', 'lm_head']
    assert bnb_config(skip_modules=['x']).llm_int8_skip_modules == ['x']

@pytest.mark.parametrize('kind', ['llava', 'qwen'])
def test_full_precision_load_forward_generate(kind, request):
    d = request.getfixturevalue(f'tiny_{kind}')
    v = load_vlm(d)
    assert v.kind == {'llava': 'llava', 'qwen': 'qwen2_5_vl'}[kind] and v.device.type == 'cpu'
    assert {p.dtype for p in v.model.parameters()} == {torch.float32}
    b = v.encode([img(), img(200, 120)], [MSGS, SHORT], [TARGET, 'A'])
    with torch.no_grad(): loss = v.model(**b).loss
    assert torch.isfinite(loss) and 9 < loss.item() < 13          # ≈ ln(vocab) for a random model
    g = v.encode([img(), img(200, 120)], [MSGS, SHORT])
    out = v.model.generate(**g, max_new_tokens=4, do_sample=False, eos_token_id=v.eos_token_ids, pad_token_id=v.tokenizer.pad_token_id)
    texts = v.decode(out[:, g.input_ids.shape[1]:])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

def test_generic_path(tiny_llava, monkeypatch):
    "A model type without first-class support goes through AutoModelForImageTextToText and reads its facts from the processor."
    monkeypatch.setattr(M, '_KINDS', {}); monkeypatch.setattr(M, 'MODEL_CLASSES', {})
    v = load_vlm(tiny_llava)
    assert v.kind == 'generic' and type(v.model).__name__ == 'LlavaForConditionalGeneration'
    assert (v.image_token, v.end_marker, v.eos_token_ids) == ('<image>', '</s>', [2])
    b = v.encode([img()], [MSGS], [TARGET])
    assert v.decode(b.labels[b.labels != -100], skip_special_tokens=False) == TARGET + '</s>'
    with torch.no_grad(): assert torch.isfinite(v.model(**b).loss)

def test_processor_without_chat_template_is_refused(tiny_llava, tmp_path):
    d = tmp_path/'no_template'
    shutil.copytree(tiny_llava, d)
    for f in d.glob('chat_template.*'): f.unlink()
    with pytest.raises(ValueError, match='no chat template'): load_vlm(d)

def test_embedded_not_built_yet(tmp_path):
    with pytest.raises(FileNotFoundError, match='04_embedded'): M._resolve('embedded', tmp_path)
    if not (M._embedded_dir()/'config.json').exists():
        with pytest.raises(FileNotFoundError, match='not built yet'): load_vlm()

def test_placement(monkeypatch):
    assert M._gpu_dtype((7, 5)) == torch.float16 and M._gpu_dtype((8, 0)) == M._gpu_dtype((9, 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert M._placement() == (None, torch.float32)
    assert M._placement(dtype='bfloat16') == (None, torch.bfloat16)
    assert M._placement('auto') == ('auto', torch.float32)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda i=0: (7, 5))   # a T4
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    assert M._placement() == ({'': 0}, torch.float16)
    monkeypatch.setenv('LOCAL_RANK', '3')                                          # one process per GPU
    assert M._placement() == ({'': 3}, torch.float16)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda i=0: (8, 0))   # an A100
    assert M._placement({'': 1}) == ({'': 1}, torch.bfloat16)

# --------------------------------------------------------------------------- 4-bit QLoRA on the CPU

def lora(model):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = r'.*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))

def state(model): return {n: p.detach().clone() for n, p in model.named_parameters()}

@pytest.mark.filterwarnings('ignore:`is_gradient_checkpointing` is deprecated')  # raised inside peft's prepare_model_for_kbit_training
@pytest.mark.parametrize('kind', ['llava', 'qwen'])
def test_4bit_lora_step_changes_lora_only(kind, request, tmp_path):
    "LoRA parameters changed, base parameters unchanged, after one optimizer step on a 4-bit model of the real class."
    import bitsandbytes as bnb
    v = load_vlm(request.getfixturevalue(f'tiny_{kind}'), quant='4bit')
    q4 = {n for n, m in v.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(q4) == 14 and all('.language_model.' in n for n in q4)      # 2 layers × 7 linear layers
    assert q4.isdisjoint(n for n, _ in v.model.named_modules() if n.startswith(tuple(M._keep_16bit(v.model))))
    assert type(v.model.lm_head) is torch.nn.Linear
    pm = lora(v.model)
    before = state(pm)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    b = v.encode([img(), img(200, 120)], [MSGS, SHORT], [TARGET, 'A'])
    pm.train(); pm(**b).loss.backward(); opt.step()
    after = state(pm)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all('lora_' in n for n in trainable)
    assert {n for n in trainable if 'lora_B' in n} <= changed                # B gets the first gradient (A's is zero while B=0)
    assert changed <= trainable                                              # base (4-bit, vision, head) unchanged
    pm.eval(); pm.save_pretrained(tmp_path/'adapter')
    with torch.no_grad(): ref = pm(**b).logits
    w = load_vlm(request.getfixturevalue(f'tiny_{kind}'), quant='4bit', adapter=tmp_path/'adapter')
    assert type(w.model).__name__ == 'PeftModel' and w.eos_token_ids == v.eos_token_ids
    with torch.no_grad(): assert torch.allclose(w.model(**b).logits, ref, atol=1e-4)

# --------------------------------------------------------------------------- memory plan

def test_plan_memory_real_7b_configs(llava_dir, qwen_dir):
    l, q = plan_memory(llava_dir, 'T4'), plan_memory(qwen_dir, 'T4')
    assert abs(l.params/1e9 - 7.06) < 0.01 and abs(q.params/1e9 - 8.29) < 0.01
    assert abs(l.weights/1e9 - 4.5) < 0.1 and abs(q.weights/1e9 - 6.9) < 0.1
    assert l.fits and q.fits and l.max_batch > q.max_batch >= 1
    assert l.params_4bit == 32*(4*4096*4096 + 3*4096*11008)                  # Llama-2-7B's linear layers, nothing else
    assert l.lora_params == 16*32*(4*(4096 + 4096) + 3*(4096 + 11008))
    big = plan_memory(qwen_dir, 'A100-80', batch_size=8)
    assert big.fits and big.total > q.total and not plan_memory(qwen_dir, 'T4', batch_size=8).fits
    assert plan_memory(qwen_dir, 40e9).gpu_bytes == 40e9
    assert 'fits' in repr(q) and 'NF4' in repr(q)
    with pytest.raises(ValueError, match='unknown gpu'): plan_memory(qwen_dir, 'K80')

def test_plan_memory_of_a_config_object(llava_dir):
    p = plan_memory(shrunk_config(llava_dir), 'T4')
    assert p.params_4bit == 2*(4*64*64 - 2*64*32 + 3*64*128) and p.fits     # GQA: k, v project 64 -> 32

# --------------------------------------------------------------------------- import cost

def test_import_does_not_load_torch():
    code = "import sys, stl_nb.models; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, '-c', code], check=True)
