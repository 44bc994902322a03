"""Models: any Hugging Face causal LM, and the offline default, a tiny Llama-architecture model.

`make_tiny` builds a character-level tokenizer and a small LlamaForCausalLM, pretrains it by
supervised learning on generated arithmetic word problems (answer format '#### n') until its
sampled accuracy on held-out problems reaches the target band, and saves both with
save_pretrained; `load` then reads that directory through AutoTokenizer / AutoModelForCausalLM,
the same from_pretrained path a hub model takes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sim.config import ConfigError
from sim.llm.data import arithmetic_examples

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "0123456789+-*/=#?!.,:;$()'\" \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\\{}^_"


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers in our output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class ModelError(ConfigError):
    """A model directory or name that cannot be loaded. str(e) is one line."""


@dataclass(frozen=True)
class TinySize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    sft_lr: float  # AdamW learning rate of make-tiny's pretraining (wider models need smaller steps)


SIZES = {"tiny": TinySize(64, 2, 4, 192, 3e-3), "small": TinySize(256, 4, 8, 768, 1e-3),
         "base": TinySize(512, 8, 8, 1536, 5e-4)}


def char_tokenizer():
    """A character-level PreTrainedTokenizerFast (one token per character; specials <pad> <s> </s> <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    quiet_transformers()

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + list(dict.fromkeys(CHARS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_model(vocab_size: int, size: str = "tiny", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def sampled_accuracy(model, tokenizer, examples, max_new_tokens: int = 8, seed: int = 0) -> float:
    """Fraction of held-out examples whose sampled completion (temperature 1) earns reward 1."""
    from sim.llm.rewards import reward

    model.eval()
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    enc = tokenizer([e.prompt for e in examples], return_tensors="pt", padding=True).to(model.device)
    gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    model.train()
    return sum(reward(t, e.answer, e.kind) for t, e in zip(texts, examples)) / len(examples)


def sft_batch(tokenizer, examples):
    """Inputs and labels for supervised learning on prompt + ' ' + answer + eos, prompt masked."""
    tokenizer.padding_side = "right"
    texts = [e.prompt + " " + e.answer + tokenizer.eos_token for e in examples]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.clone()
    labels[enc.attention_mask == 0] = -100
    for i, e in enumerate(examples):
        labels[i, :len(tokenizer(e.prompt).input_ids)] = -100
    return enc, labels


def make_tiny(out: Path, size: str = "tiny", difficulty: int = 1, seed: int = 0, target=(0.2, 0.8),
              stop_at: float = 0.35, max_steps: int = 3000, batch_size: int = 64, lr: float | None = None,
              eval_every: int = 50, log=print, device: str = "cpu") -> dict:
    """Pretrain and save the offline default model (float32, on ``device``); returns its training
    record (also saved)."""
    out = Path(out)
    tokenizer = char_tokenizer()
    model = tiny_model(len(tokenizer), size, seed).to(device)
    train = arithmetic_examples(batch_size * max_steps, difficulty, seed)
    held_out = arithmetic_examples(200, difficulty, seed + 10_000)
    opt = torch.optim.AdamW(model.parameters(), lr=SIZES[size].sft_lr if lr is None else lr)
    t0 = time.perf_counter()
    acc, step = 0.0, 0
    for step in range(1, max_steps + 1):
        enc, labels = sft_batch(tokenizer, train[(step - 1) * batch_size: step * batch_size])
        loss = model(**enc.to(device), labels=labels.to(device)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0:
            acc = sampled_accuracy(model, tokenizer, held_out, seed=step)
            log(f"step {step}: loss {loss.item():.3f}, sampled accuracy {acc:.2f}")
            if stop_at <= acc <= target[1]:
                break
    if not target[0] <= acc <= target[1]:
        raise ModelError(f"make-tiny: sampled accuracy {acc:.2f} after {step} steps is outside "
                         f"[{target[0]}, {target[1]}]; try another --seed or --difficulty")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"size": size, "device": str(device), "difficulty": difficulty, "seed": seed, "steps": step,
              "sampled_accuracy": acc,
              "held_out": len(held_out), "seconds": time.perf_counter() - t0,
              "parameters": sum(p.numel() for p in model.parameters()), "config": asdict(SIZES[size])}
    (out / "grpo_sim_pretraining.json").write_text(json.dumps(record, indent=1))
    return record


def is_local_name(name: str) -> bool:
    """Whether ``name`` names a local directory, not a hub model: it exists, starts with '.', '/'
    or '~', or its first component is an existing directory or 'models' (the project's default
    place: models/tiny)."""
    first = Path(name).parts[0] if Path(name).parts else name
    return Path(name).exists() or name.startswith((".", "/", "~")) or first == "models" or \
        (len(Path(name).parts) > 1 and Path(first).is_dir())


def check_model(name_or_path: str) -> None:
    """ModelError in one line, before any download or output directory, for a local model that is
    not there or not a model directory, and for a hub name that is neither cached nor reachable."""
    import os

    p = Path(os.path.expanduser(name_or_path))
    if is_local_name(name_or_path):
        if not p.exists():
            hint = "; make one with: sim llm make-tiny" if Path(name_or_path).parts[:1] == ("models",) else ""
            raise ModelError(f"model: no such model directory {name_or_path}{hint}")
        if not (p / "config.json").is_file():
            raise ModelError(f"model: {name_or_path} is not a model directory (no config.json)")
        return
    from huggingface_hub import try_to_load_from_cache

    from sim.llm.data import hub_reachable

    if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str) and not hub_reachable():
        raise ModelError(f"model: {name_or_path!r} is not a local directory, not in the Hugging Face cache, "
                         "and the hub cannot be reached")


def load(name_or_path: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) via AutoModelForCausalLM / AutoTokenizer.from_pretrained; one-line ModelError
    for a missing or corrupt directory or an unreachable hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    check_model(name_or_path)
    try:
        import os

        name_or_path = os.path.expanduser(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).to(device)
    except Exception as e:  # corrupt weights, bad json, offline hub, ...
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise ModelError(f"model: cannot load {name_or_path} ({type(e).__name__}: {msg})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
