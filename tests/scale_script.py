"Run by tests/test_scale.py under `accelerate launch --multi_gpu --num_processes 2` on the CPU: `generate` (shared out by question), then DDP training."
import json, sys, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
import torch
torch.set_num_threads(1)
from transformers.utils import logging as hf_logging
hf_logging.disable_progress_bar(); hf_logging.set_verbosity_error()
from stl_nb.durable import process_info
from stl_nb.generate import GenConfig, generate, style_of
from stl_nb.loop import direct_examples
from stl_nb.models import load_vlm
from stl_nb.train import embedded_train_config, train_qlora
from stl_nb.world import make_world

out, n = Path(sys.argv[1]), int(sys.argv[2])
qs = make_world(n, seed=0)
vlm = load_vlm('embedded')   # on a GPU, load_vlm puts each process's copy on its own (LOCAL_RANK)
recs = generate(vlm, qs, out/'sharded.jsonl', GenConfig(max_new_tokens=24, batch_size=1), progress=False)
rank, world = process_info()
torch.manual_seed(0)
res = train_qlora(vlm, direct_examples(qs, style_of(vlm)), embedded_train_config(epochs=1, batch_size=2, logging_steps=1),
                  out/'train', progress=False)
lora = {k: v.detach().double().sum().item() for k, v in vlm.model.named_parameters() if 'lora_' in k}
(out/f'rank{rank}.json').write_text(json.dumps(dict(rank=rank, world=world, records=len(recs), lora=lora,
                                                    updates=[s for s, _ in res.losses], adapter=res.adapter_dir)))
