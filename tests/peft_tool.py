"""Run by a Python that has torch + peft (not the test environment), to check our PEFT files against PEFT itself.

    python peft_tool.py logits MODEL_DIR ADAPTER_DIR TOKEN_ID...   PEFT's logits, as JSON
    python peft_tool.py make MODEL_DIR OUT_DIR R ALPHA RSLORA DORA  a PEFT LoRA with random updates, saved by PEFT
"""

import json
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

command, model_dir, adapter_dir, *rest = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
if command == "logits":
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[int(t) for t in rest]])).logits[0]
    print(json.dumps(logits.tolist()))
else:
    r, alpha, rslora, dora = int(rest[0]), float(rest[1]), rest[2] == "1", rest[3] == "1"
    torch.manual_seed(0)
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=dora, target_modules=["q_proj", "v_proj", "down_proj"],
                        layers_to_transform=[1, 3], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(adapter_dir)
