"""What lora-merge is benchmarked against: PEFT's merge done the way its get_delta_weight does it
(B @ A * scale in float32 on CPU, cast back to the weight's type), on a base loaded whole with
safetensors.torch, then saved. Usage: bench_peft_merge.py BASE.safetensors ADAPTER_DIR OUT"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

base_path, adapter_dir, out = sys.argv[1:4]
cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
scale = cfg["lora_alpha"] / cfg["r"]
weights = load_file(base_path)
adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
for key in [k for k in adapter if k.endswith(".lora_A.weight")]:
    module = key[len("base_model.model."):-len(".lora_A.weight")]
    w = weights[module + ".weight"]
    delta = (adapter[key.replace("lora_A", "lora_B")].float() @ adapter[key].float()) * scale
    weights[module + ".weight"] = (w.float() + delta).to(w.dtype)
save_file(weights, out)
