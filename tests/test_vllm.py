"""The vLLM backend (chapter 06a) in the loop, against a stand-in `vllm` module (vLLM needs a GPU and is not a dependency):
one engine per run, a LoRA id per adapter folder, no transformers model loaded to generate, and clear refusals without vLLM."""
import importlib.machinery, os, subprocess, sys, types
from types import SimpleNamespace as NS
import pytest
from conftest import STL_RUN
from stl_nb.generate import read_records
from stl_nb.loop import RunError, run_stl, tiny_config, check_run
import stl_nb.loop as loop

POSITIVE = "CAPTION: a scene.\n\nREASONING: it is the first option.\n\nCONCLUSION: (A)"
NEGATIVE = "CAPTION: a scene.\n\nEXPLANATION: that option does not fit the scene."

class StandIn:
    "What `vllm_engine` and `vllm_backend` use of vLLM: `LLM(...)`, `LLM.generate`, `SamplingParams`, `LoRARequest`."
    def __init__(self): self.engines, self.calls = [], []
    def module(self):
        m = types.ModuleType('vllm'); m.__spec__ = importlib.machinery.ModuleSpec('vllm', None)
        test = self
        class LLM:
            def __init__(self, model, **kw): test.engines.append(dict(model=model, **kw))
            def generate(self, reqs, sp, lora_request=None, use_tqdm=True):
                test.calls.append(dict(n=len(reqs), sp=vars(sp), lora=lora_request and vars(lora_request),
                                       prompts=[r['prompt'] for r in reqs]))
                text = lambda r: NEGATIVE if 'EXPLANATION' in r['prompt'] else POSITIVE
                return [NS(outputs=[NS(text=text(r), token_ids=[0]*7, finish_reason='stop')]*sp.n) for r in reqs]
        m.LLM, m.SamplingParams = LLM, (lambda **kw: NS(**kw))
        m.lora = types.ModuleType('vllm.lora'); m.lora.request = types.ModuleType('vllm.lora.request')
        m.lora.request.LoRARequest = lambda **kw: NS(**kw)
        return {'vllm': m, 'vllm.lora': m.lora, 'vllm.lora.request': m.lora.request}

def test_loop_with_vllm_backend(tmp_path, monkeypatch):
    import torch; torch.set_num_threads(1)
    fake = StandIn()
    for k, v in fake.module().items(): monkeypatch.setitem(sys.modules, k, v)
    loads = []
    real_load = loop.load_vlm
    monkeypatch.setattr(loop, 'load_vlm', lambda *a, **k: loads.append(a) or real_load(*a, **k))
    cfg = tiny_config(backend='vllm', limit=16, test_limit=8, rounds=2, out=str(tmp_path/'run'))
    m = run_stl(cfg, progress=False)
    assert [r['round'] for r in m['rounds']] == [0, 1, 2]
    assert len(fake.engines) == 1 and fake.engines[0]['enable_lora'] and fake.engines[0]['max_lora_rank'] == 16
    assert fake.engines[0]['model'].endswith('embedded')
    assert len(loads) == 2                      # the base, once per round's training: generation never loads a transformers model
    pos = read_records(tmp_path/'run'/'round_1'/'positives.jsonl')
    assert pos and {r['raw'] for r in pos} == {POSITIVE}
    neg = read_records(tmp_path/'run'/'round_1'/'negatives.jsonl')
    assert neg and {r['raw'] for r in neg} == {NEGATIVE}
    # adapters by stage: round 0 test, round 1 data (base), round 1 test, round 2 data (round 1's), round 2 test
    ids = [(c['lora'] or {}).get('lora_int_id') for c in fake.calls]
    paths = {(c['lora'] or {}).get('lora_int_id'): (c['lora'] or {}).get('lora_path') for c in fake.calls}
    assert ids[0] is None and set(ids) == {None, 1, 2} and ids[-1] == 2
    assert paths[1].endswith(os.path.join('round_1', 'adapter')) and paths[2].endswith(os.path.join('round_2', 'adapter'))
    assert all(c['sp']['max_tokens'] in (cfg.gen.max_new_tokens, cfg.eval_gen.max_new_tokens) for c in fake.calls)
    assert read_records(tmp_path/'run'/'round_2'/'test.jsonl')[0]['adapter'] == 'round_2/adapter'

def test_r3v_with_vllm_backend(tmp_path, monkeypatch):
    "R3V through vLLM: its 3 samples a question are one request with n=3 at R3V's temperature; select prompts carry them."
    import torch; torch.set_num_threads(1)
    fake = StandIn()
    for k, v in fake.module().items(): monkeypatch.setitem(sys.modules, k, v)
    cfg = tiny_config(backend='vllm', method='r3v', limit=8, test_limit=4, rounds=1, out=str(tmp_path/'run'))
    m = run_stl(cfg, progress=False)
    sampled = [c for c in fake.calls if c['sp']['n'] == 3]
    assert sampled and all(c['sp']['temperature'] == 0.9 and c['sp']['top_p'] == 0.95 for c in sampled)
    assert sum(c['n'] for c in sampled) == 8 + 4               # one request per training and per test question
    select = [p for c in fake.calls for p in c['prompts'] if 'prediction 1:' in p]
    assert len(select) == 4 and all(p.count(POSITIVE.replace(chr(10) * 2, ' ')) == 3 for p in select)
    assert len(read_records(tmp_path/'run'/'round_1'/'positives.jsonl')) == 3 * 8
    assert m['rounds'][1]['select_accuracy'] is not None

def test_refused_without_vllm(monkeypatch, tmp_path):
    import importlib.util
    if importlib.util.find_spec('vllm') is not None: pytest.skip("vLLM is installed here")
    with pytest.raises(RunError, match='pip install vllm'): check_run(tiny_config(backend='vllm'))
    with pytest.raises(RunError, match="backend must be 'hf' or 'vllm'"): tiny_config(backend='tgi')
    if STL_RUN is None: pytest.skip("the stl_run command is not installed (pip install -e .)")
    p = subprocess.run([str(STL_RUN), '--backend', 'vllm', '--out', str(tmp_path/'r')], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and 'pip install vllm' in p.stderr and not (tmp_path/'r').exists()

def test_old_config_without_backend_resumes(tmp_path):
    "A run folder written before `backend` existed is resumed, not refused as another config."
    from stl_nb.loop import prepare_out, read_json, write_json
    cfg = tiny_config(out=str(tmp_path/'r'))
    old = cfg.to_dict(); old.pop('backend')
    (tmp_path/'r').mkdir(); write_json(tmp_path/'r'/'config.json', old)
    prepare_out(cfg)
    assert read_json(tmp_path/'r'/'config.json')['backend'] == 'hf'
