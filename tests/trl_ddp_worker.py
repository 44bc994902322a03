"""Run by tests/test_llm_trl.py under 2 processes (torch.distributed.run, accelerate launch): a few steps of TRL's
GRPOTrainer with grpo-sim's diagnostics on CPU (gloo); each rank writes what it logged as JSON."""

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch.distributed
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from sim.llm import model as model_mod
from sim.llm.trl import GrpoSimDiagnostics

faulthandler.enable()  # a native crash prints the Python stack (the test shows it)
out = Path(sys.argv[1])
tok = model_mod.char_tokenizer()
model = model_mod.tiny_model(len(tok), "tiny", seed=0)
ds = Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(64)]})


def reward(prompts, completions, **kw):
    return [float(len(c) % 2) for c in completions]


diag = GrpoSimDiagnostics(num_generations=4, out=out / "res")
args = GRPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=6, max_steps=3, logging_steps=1, report_to=[], use_cpu=True,
                  save_strategy="no", beta=0.0, seed=0, disable_tqdm=True)
trainer = GRPOTrainer(model=model, reward_funcs=diag.wrap(reward), args=args, train_dataset=ds,
                      processing_class=tok, callbacks=[diag])
trainer.train()
rank = trainer.accelerator.process_index
logs = [{k: v for k, v in h.items() if k == "frac_reward_zero_std" or k.startswith("grpo_sim/")}
        for h in trainer.state.log_history if "frac_reward_zero_std" in h]
(out / f"rank{rank}.json").write_text(json.dumps({"world": trainer.accelerator.num_processes, "refused": diag.refused,
                                                  "logs": logs, "groups": [len(r["sigma_per_prompt"])
                                                                           for r in diag.rows]}))
# leave together: a rank that exits while the other still talks to it can abort in gloo's teardown
trainer.accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
# and without running C++ static destructors: a gloo thread still joinable there aborts the process
# ("terminate called without an active exception": a SIGABRT with no Python frame, seen once in CI;
# when it struck is not known); what this rank reports is written and flushed already
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
