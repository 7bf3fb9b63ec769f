"bench/gpu_check.py at tiny sizes on the CPU, so the GPU check (run by hand on a lent GPU) cannot rot."
import json, os, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ['--tiny', '--device', 'cpu', '--new-tokens', '6', '--gen-batch', '3', '--gen-single', '2',
         '--train-batch', '1', '2', '--train-steps', '1', '--text-tokens', '32']

def run(llava_dir, tmp_path, *extra, pre=''):
    out = tmp_path/'report.json'
    code = f"import sys; {pre}sys.path.insert(0, {str(REPO/'bench')!r}); import gpu_check; gpu_check.main(sys.argv[1:])"
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    p = subprocess.run([sys.executable, '-c', code, *SMALL, '--fixture', str(llava_dir), '--out', str(out), *extra],
                       capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()), p.stdout

def test_tiny_qlora(llava_dir, tmp_path):
    rep, stdout = run(llava_dir, tmp_path, '--skip', 'fastgen')
    assert rep['errors'] == [] and rep['warnings'] == [], (rep['errors'], rep['warnings'])
    m = rep['model']
    assert m['quant_path'] == 'swap' and m['linear4bit'] == 14 and m['image_tokens'] == 576
    assert m['kept_16bit'] == ['model.vision_tower', 'model.multi_modal_projector', 'lm_head']
    g, t = rep['generation'], rep['training']
    assert g['one_at_a_time']['new_tokens_per_reply'] == [6]*2 and g['batch_3']['new_tokens_per_reply'] == [6]
    assert t['lora_layer_types'] == ['peft.tuners.lora.bnb.Linear4bit']
    for bs in (1, 2):
        r = t[f'batch_{bs}']
        assert r['seq_len'] == 1 + 576 + 31 and r['tokens_per_s'] > 0 and r['peak_gb'] > 0
    assert 'generation (6 new tokens' in stdout and 'batch_2' in stdout

FAST = ['--skip', 'generate', 'train', '--fast-batch', '2', '4', '--fast-base-batch', '2', '--fast-prompts', '4', '--fast-text', '5', '30']

def test_tiny_fastgen(llava_dir, tmp_path):
    "Issue 17's part: 4-bit + LoRA, then the merged copy at two batches, unsorted and sorted, each with its peak and pad tokens."
    rep, stdout = run(llava_dir, tmp_path, *FAST)
    assert rep['errors'] == [] and 'generation' not in rep and 'training' not in rep
    f = rep['fastgen']
    assert f['linear4bit_left'] == 0 and f['bandwidth_tb_s'] is None          # a CPU: no bound to compare with
    runs = [(r['path'], r['batch_size'], r['sorted']) for r in f['runs']]
    assert runs == [('4-bit+LoRA', 2, False), ('4-bit+LoRA', 2, True)] + [('merged 16-bit', b, s) for b in (2, 4) for s in (False, True)]
    assert all(r['new_tokens_per_s'] > 0 and r['peak_gb'] > 0 and 'speedup_vs_4bit' in r for r in f['runs'])
    assert f['runs'][1]['pad_tokens'] <= f['runs'][0]['pad_tokens']          # sorted batches pad no more
    assert 'fast generation (6 new tokens' in stdout and 'merged 16-bit' in stdout

def test_without_bitsandbytes(llava_dir, tmp_path):
    "On a machine without bitsandbytes it says so and measures 16/32-bit LoRA instead."
    rep, stdout = run(llava_dir, tmp_path, '--skip', 'generate', 'fastgen', '--train-batch', '1', pre="sys.modules['bitsandbytes'] = None; ")
    assert rep['errors'] == [] and 'bitsandbytes is not importable' in rep['warnings'][0]
    assert 'generation' not in rep and rep['training']['lora_layer_types'] == ['peft.tuners.lora.layer.Linear']
    assert 'WARNING bitsandbytes is not importable' in stdout
