"""Run by tests/test_llm.py under 2 processes (torch.distributed.run, accelerate launch): a few DDP steps of
the trainer on CPU (gloo), then each rank writes the SHA-1 of its parameters."""

import hashlib
import sys
from pathlib import Path

from sim.llm.trainer import LLMConfig, Trainer

model_dir, out = sys.argv[1], Path(sys.argv[2])
cfg = LLMConfig(model=model_dir, estimator="grpo_batch", steps=3, prompts_per_step=4, group_size=4,
                max_new_tokens=4, diag_every=2, device="cpu", lr=1e-3)
trainer = Trainer(cfg, out, log=lambda *a: None)
trainer.run()
params = trainer.acc.unwrap_model(trainer.model).parameters()
digest = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in params)).hexdigest()
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{trainer.rank}.sha1").write_text(digest)
