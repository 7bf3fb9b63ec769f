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
    rep, stdout = run(llava_dir, tmp_path)
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

def test_without_bitsandbytes(llava_dir, tmp_path):
    "On a machine without bitsandbytes it says so and measures 16/32-bit LoRA instead."
    rep, stdout = run(llava_dir, tmp_path, '--skip', 'generate', '--train-batch', '1', pre="sys.modules['bitsandbytes'] = None; ")
    assert rep['errors'] == [] and 'bitsandbytes is not importable' in rep['warnings'][0]
    assert 'generation' not in rep and rep['training']['lora_layer_types'] == ['peft.tuners.lora.layer.Linear']
    assert 'WARNING bitsandbytes is not importable' in stdout
