"""Policy-gradient training of a causal LM with the simulator's estimators and diagnostics.

Dimension legend: P prompts per step (all ranks), G completions per prompt (g indexes them),
N = P*G sequences (k indexes them), L sequence length, V vocabulary, n parameters in the
diagnostic subset.

Each step: sample G completions for each of P prompts, score them (sim.llm.rewards), turn the
[P, G] rewards into advantages with sim.estimators.advantages (the same function as the
simulator), and take one optimizer step on the sequence-level policy-gradient loss

    loss = - agg_{sequences k, tokens t} A_k log pi(y_k,t | x, y_k,<t)

with the aggregation named as TRL / verl name it (DESIGN.md §4):
    seq-mean-token-mean      TRL loss_type="grpo", verl "seq-mean-token-mean"
    token-mean               TRL "dapo", verl "token-mean": token sum / the token count of the whole
                             batch, all ranks (gathered), so every token weighs the same under DDP
    token-mean-local         TRL "bnpo": token sum / this rank's token count (equal to token-mean
                             on one process; under DDP a rank with fewer tokens weighs its own more)
    seq-mean-token-sum-norm  TRL "dr_grpo", verl "seq-mean-token-sum-norm" (token sum / max_new_tokens)

Log-probabilities are those of the sampling distribution, softmax(logits / temperature), as TRL
computes them; the loss mask keeps every completion token up to and including the first EOS
(TRL's completion_mask: a generated token equal to the pad id before it counts).

Under `accelerate launch` (DDP) the prompts are split across ranks; rewards are gathered so
every rank computes the advantages of the whole batch (grpo_batch's batch std included) and
keeps its own rows; DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import random
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

import theory
from sim import estimators
from sim.config import ConfigError, check_device, check_value, option, resolve_device
from sim.llm import data as data_mod
from sim.llm import model as model_mod
from sim.llm.rewards import reward
from sim.results import stable_id, write_manifest, write_parquet

LOSS_AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "token-mean-local", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LLMConfig:
    """One LLM training run."""

    model: str = field(default="models/tiny", metadata=option("model directory or hub name"))
    data: str = field(default="arith", metadata=option("arith | gsm8k:PATH | math:PATH"))
    difficulty: int = field(default=1, metadata=option("difficulty of generated arithmetic problems", min=1, max=3))
    estimator: str = field(default="grpo", metadata=option("advantage estimator", choices=estimators.LLM_NAMES))
    group_size: int = field(default=8, metadata=option("completions G per prompt", min=1, max=1024))
    prompts_per_step: int = field(default=16, metadata=option("prompts P per step (all ranks)", min=1, max=4096))
    steps: int = field(default=200, metadata=option("training steps", min=1, max=1_000_000))
    lr: float = field(default=5e-4, metadata=option("learning rate", min=0.0, max=10.0, open_min=True))
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata=option("optimizer"))
    loss_agg: str = field(default="seq-mean-token-mean", metadata=option("loss aggregation (TRL/verl names)",
                                                                       choices=LOSS_AGGREGATIONS))
    max_new_tokens: int = field(default=8, metadata=option("completion length limit", min=1, max=4096))
    temperature: float = field(default=1.0, metadata=option("sampling temperature", min=0.0, max=10.0,
                                                          open_min=True))
    eps: float = field(default=1e-4, metadata=option("eps added to the std (GRPO-type)", min=0.0, max=1e3))
    ddof: int = field(default=1, metadata=option("ddof of the group std", min=0, max=1))
    seed: int = field(default=0, metadata=option("seed of prompt order and sampling", min=0, max=2**31))
    diag_every: int = field(default=10, metadata=option("diagnostics every k steps (0 = never)", min=0,
                                                     max=1_000_000))
    diag_params: str = field(default="last-mlp", metadata=option(
        "parameter subset of the per-prompt gradients: last-mlp, lm_head, or a name substring"))
    diag_proj: int = field(default=0, metadata=option("random projection dim of per-prompt gradients (0 = none)",
                                                    min=0, max=1_000_000))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=option(
        "auto (a GPU when present) | cpu | cuda"))
    save_every: int = field(default=0, metadata=option("checkpoint every k steps (0 = only at the end)", min=0,
                                                     max=1_000_000))
    backend: Literal["native", "trl"] = field(default="native", metadata=option(
        "native: this runner; trl: TRL's GRPOTrainer with the same estimator, data, rewards and model "
        "(sim.llm.trl, needs the trl extra)"))


def validate(cfg: LLMConfig) -> None:
    for f in dataclasses.fields(LLMConfig):
        check_value(LLMConfig, f.name, getattr(cfg, f.name))
    min_group = estimators.get(cfg.estimator).min_group
    if cfg.group_size < min_group:
        raise ConfigError(f"group-size: {cfg.estimator} needs at least {min_group} completions per prompt")
    check_device(cfg.device)


def preflight(cfg: LLMConfig) -> None:
    """The model and the data of ``cfg`` checked (one-line ModelError / DataError) before a run
    creates its output directory: a local model must be a model directory, a hub one cached or
    reachable; the data are read in full (a generated set is made)."""
    from sim.llm import data as data_mod
    from sim.llm import model as model_mod

    model_mod.check_model(cfg.model)
    data_mod.load_data(cfg.data, difficulty=cfg.difficulty, seed=cfg.seed)


def run_id(cfg: LLMConfig) -> str:
    return stable_id(dataclasses.asdict(cfg), 16)


def completion_mask(sequences: torch.Tensor, prompt_len: int, eos_id: int, pad_id: int | None = None) -> torch.Tensor:
    """[N, L] -> [N, L-1] mask over predicted positions: every completion token up to and including
    the first eos (position j predicts token j+1), as TRL's GRPOTrainer masks completions; what
    generate() pads after the eos is left out, a pad-id token before it is not. (``pad_id`` is
    accepted for callers that pass it; it does not change the mask.)"""
    comp = sequences[:, prompt_len:]  # [N, C]
    is_eos = comp == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # tokens strictly after the first eos
    valid = ~after_eos
    mask = torch.zeros(sequences.shape[0], sequences.shape[1] - 1, dtype=torch.bool, device=sequences.device)
    mask[:, prompt_len - 1:] = valid
    return mask


def token_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_j+1 | y_<=j) for every position, pi = softmax(logits / temperature), the distribution
    the completions were sampled from (TRL divides the logits the same way): [N, L-1]."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate() numbers left-padded input
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids).logits[:, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, sequences[:, 1:].unsqueeze(-1)).squeeze(-1)


def pg_loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, agg: str, max_new_tokens: int,
            global_tokens: float | None = None, world_size: int = 1) -> torch.Tensor:
    """Sequence-level policy-gradient loss -agg(A_k log pi) (module docstring). logp, mask [N, L-1]; adv [N].

    token-mean divides by ``global_tokens``, the completion tokens of all ranks (this rank's when
    None), times ``world_size`` because DDP averages the ranks' gradients: the sum over ranks of the
    token sums over the global count, TRL's dapo."""
    m = mask.to(logp.dtype)
    per_tok = -adv.to(logp.dtype).unsqueeze(-1) * logp * m
    if agg == "seq-mean-token-mean":
        return (per_tok.sum(-1) / m.sum(-1).clamp_min(1)).mean()
    if agg == "token-mean":
        count = m.sum() if global_tokens is None else torch.as_tensor(global_tokens, dtype=logp.dtype)
        return per_tok.sum() * world_size / count.clamp_min(1)
    if agg == "token-mean-local":
        return per_tok.sum() / m.sum().clamp_min(1)
    if agg == "seq-mean-token-sum-norm":
        return per_tok.sum() / (per_tok.shape[0] * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {agg!r}")


def diag_parameters(model, spec: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameter subset of the per-prompt gradients (see LLMConfig.diag_params)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if spec == "last-mlp":
        cands = [(n, p) for n, p in named if n.endswith("mlp.down_proj.weight")] or [(n, p) for n, p in named
                                                                                     if p.dim() == 2]
        return cands[-1:]
    if spec == "lm_head":
        out = [(n, p) for n, p in named if "lm_head" in n]
        return out or [(n, p) for n, p in named if "embed" in n][-1:]
    out = [(n, p) for n, p in named if spec in n]
    if not out:
        raise ConfigError(f"diag-params: no parameter name contains {spec!r}")
    return out


#: Largest per-sequence gradient block (sequences x parameters) ``combined_gradients`` holds in memory;
#: above it the rows are formed from coefficient-weighted output gradients instead (same numbers).
PER_SEQUENCE_BUDGET = 2**25


def _linear_owners(model, params) -> list[tuple[torch.nn.Linear, str]] | None:
    """(module, "weight" | "bias") of each parameter when every one is the weight or bias of an
    nn.Linear that holds no other module's parameter (tied weights get gradient elsewhere too);
    None otherwise."""
    holders: dict[int, list] = {}
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((mod, name))
    out = []
    for p in params:
        h = holders.get(id(p), [])
        if len(h) != 1 or not isinstance(h[0][0], torch.nn.Linear) or h[0][1] not in ("weight", "bias"):
            return None
        out.append(h[0])
    return out


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout in a diagnostic) for the duration, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _autograd_from(modules):
    """Autograd records nothing until the first call of one of ``modules`` and everything from it
    on (a forward pre-hook switches grad mode on; the caller's mode is restored after). With
    parameters that only their own module uses (``_linear_owners``) nothing computed before that
    call depends on them, so gradients to their outputs or to them are those of a fully recorded
    forward, without the graph of the layers before."""
    def switch_on(mod, args) -> None:  # (a pre-hook's return value would replace the module's input)
        torch.set_grad_enabled(True)

    hooks = [m.register_forward_pre_hook(switch_on) for m in modules]
    try:
        with torch.no_grad():
            yield
    finally:
        for h in hooks:
            h.remove()


def _cache_argument(model) -> str | None:
    """The name under which ``model``'s forward takes a KV cache (transformers 5: ``cache``, 4:
    ``past_key_values``); None when its signature names neither."""
    names = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in names), None)


#: Models on which the shared-prefix forward was checked against the whole-sequence one (True: they
#: agree), so the check costs one extra forward per model (``_shared_prefix_logp``).
_PREFIX_AGREES: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def _sequence_logp(model, seqs, attn, mask, temperature: float) -> torch.Tensor:
    """sum_j mask_kj log pi(y_k,j+1 | y_k,<=j) of every sequence, one whole-sequence forward: [N]."""
    return (token_logprobs(model, seqs, attn, temperature) * mask).sum(-1)


def _shared_prefix_logp(model, modules, seqs, attn, mask, temperature: float, record):
    """The sequence log-probs sum_j mask_kj log pi(y_k,j+1 | y_k,<=j) [N] from a forward that runs
    each distinct prefix once: every sequence's tokens before its first predicted position j0_k (the
    prompt but its last token, shared by the G completions of a group) go through the model once
    per distinct prefix without autograd, into a KV cache that is gathered to the N sequences; a
    second forward on the windows seq[k, j0_k : j0_k + W] (W the widest span of predicted
    positions) with that cache gives the log-probs, ``record`` (a context manager) around it alone.
    Positions and attention are those of the whole-sequence forward (position = number of attended
    tokens before), so the log-probs are equal up to float rounding. Exact gradients to ``modules``
    need the cache not to depend on them: the prefix pass runs under ``_autograd_from(modules)``,
    and a cache tensor that requires grad (a prefix token that passed one of them before feeding a
    later attention layer) refuses the path. Returns (log-probs [N] with their graph, the window
    shape (N, W)), or None where the path does not apply (no prefix, a model in training mode or
    without a KV cache of key / value tensors, or one on which the check of ``_PREFIX_AGREES``
    failed); the caller then runs the whole sequences."""
    cache_arg = _cache_argument(model)
    if cache_arg is None or model.training or _PREFIX_AGREES.get(model) is False:
        return None  # (in training mode dropout or gradient checkpointing would make the two forwards differ)
    N, L = seqs.shape
    first = mask.to(torch.int8).argmax(-1)  # j0_k: the first predicted position
    last = (L - 2) - mask.flip(-1).to(torch.int8).argmax(-1)
    if int(first.min()) < 1:
        return None
    W = int((last - first).max()) + 1
    seqs_c, attn_c, first_c = seqs.cpu(), attn.cpu(), first.cpu().tolist()
    index: dict[tuple, int] = {}
    owner = []  # owner[k]: the distinct prefix of sequence k
    for k, j0 in enumerate(first_c):
        key = (seqs_c[k, :j0].numpy().tobytes(), attn_c[k, :j0].numpy().tobytes())
        owner.append(index.setdefault(key, len(index)))
    reps = {u: k for k, u in reversed(list(enumerate(owner)))}  # a sequence of every prefix
    width = max(first_c)
    U = len(index)
    pre_ids = torch.zeros(U, width, dtype=seqs.dtype)
    pre_attn = torch.zeros(U, width, dtype=attn.dtype)
    for u, k in reps.items():  # left-padded, as generate() batches prompts
        j0 = first_c[k]
        pre_ids[u, width - j0:], pre_attn[u, width - j0:] = seqs_c[k, :j0], attn_c[k, :j0]
    dev = seqs.device
    pre_ids, pre_attn = pre_ids.to(dev), pre_attn.to(dev)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with _autograd_from(modules):
        out = model(input_ids=pre_ids, attention_mask=pre_attn,
                    position_ids=(pre_attn.long().cumsum(-1) - 1).clamp_min(0), use_cache=True, **keep)
    cache = out.get("cache", out.get("past_key_values"))
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(cache, "batch_select_indices") or not all(
            isinstance(getattr(x, "keys", None), torch.Tensor) and isinstance(getattr(x, "values", None), torch.Tensor)
            and x.keys.shape[0] == U and not (x.keys.requires_grad or x.values.requires_grad) for x in layers):
        return None
    owner_t = torch.tensor(owner, device=dev)
    cache.batch_select_indices(owner_t)
    span = first[:, None] + torch.arange(W, device=dev)  # [N, W] predicted positions
    pad = lambda x, fill: torch.cat([x, torch.full((N, W + 1), fill, dtype=x.dtype, device=dev)], 1)
    ids_p, attn_p, mask_p = pad(seqs, 0), pad(attn, 0), pad(mask, False)
    win_ids, targets = ids_p.gather(1, span), ids_p.gather(1, span + 1)
    win_attn, win_mask = attn_p.gather(1, span), mask_p.gather(1, span)
    before = pre_attn[owner_t]  # [N, width]
    position_ids = (before.long().sum(-1, keepdim=True) + win_attn.long().cumsum(-1) - 1).clamp_min(0)
    with record, _autograd_from(modules):
        logits = model(input_ids=win_ids, attention_mask=torch.cat([before, win_attn], 1), position_ids=position_ids,
                       use_cache=True, **{cache_arg: cache}).logits.float() / temperature
        seq_logp = (torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * win_mask).sum(-1)
    if model not in _PREFIX_AGREES:  # once per model: the whole-sequence forward gives the same numbers
        with torch.no_grad():
            whole = _sequence_logp(model, seqs, attn, mask, temperature)
        dtype = next(model.parameters()).dtype  # rounding of the coarser of the model's and float32's
        tol = math.sqrt(max(torch.finfo(dtype).eps if dtype.is_floating_point else 0.0, torch.finfo(torch.float32).eps))
        _PREFIX_AGREES[model] = bool((seq_logp.detach() - whole).abs().max() <= tol * (1 + float(whole.abs().max())))
        if not _PREFIX_AGREES[model]:
            return None
    return seq_logp, (N, W)


def combined_gradients(model, params, seqs, attn, mask, coeffs: torch.Tensor, temperature: float = 1.0,
                       ref_logp: torch.Tensor | None = None,
                       shared_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sum_k coeffs[j, k] grad w_k on ``params``, w_k = exp(log pi(y_k) - ref_k), log pi(y_k)
    the sequence log-probability at ``temperature`` (ref = log pi at the current theta by default,
    where grad w_k = grad log pi(y_k)): ([J, n] float32, sequence log-probs [N]). coeffs [J, N].

    Only the sequences with a non-zero coefficient in some row are run (the others add nothing to
    any row: a group whose rewards are all equal); their log-probs are returned as NaN (not
    computed; 0 for a sequence with no predicted position), and a ``ref_logp`` must be finite
    where a coefficient is not 0.

    One forward pass. When every parameter is the weight or bias of an nn.Linear called once, on
    [N, L, in] activations of the N sequences (the last-mlp subset of the runner's models), one
    backward pass to those layers' outputs gives every sequence's own gradient. This assumes the
    sequences of a batch do not interact, as in a causal LM's forward (no batch statistics, no
    routing of tokens across sequences): with the layer input x_k,t and the output gradient
    delta_k,t = d w_k / d out_k,t, grad_W w_k = sum_t delta_k,t x_k,t^T and grad_b w_k = sum_t
    delta_k,t, and the rows are their coeffs-weighted sums. Otherwise (tied weights, a layer called
    twice or on another layout, its input or output changed in place after the call) one backward
    pass per row. With such layers, autograd records from their first call on (``_autograd_from``),
    and with ``shared_prefix`` the forward runs each prompt once for its group
    (``_shared_prefix_logp``, where the prompt's KV cache does not depend on them: the last-mlp
    subset), L then the span of the completions. ``batched_gradients`` does several such calls in
    one forward."""
    (rows, logp), = batched_gradients(model, params, [(seqs, attn, mask, coeffs, ref_logp)], temperature,
                                      shared_prefix)
    return rows, logp


def batched_gradients(model, params, batches, temperature: float = 1.0,
                      shared_prefix: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``combined_gradients`` of several batches (seqs [N_b, L_b], attn, mask [N_b, L_b - 1],
    coeffs [J_b, N_b], ref_logp [N_b] or None) from one forward over all their sequences (right-
    padded to one length: padding after a sequence's last token changes no causal log-prob) and one
    backward, the coefficients block-diagonal: the same numbers as one call per batch, with one
    model call's fixed cost (the TRL callback runs the empirical M's pass at theta_t+1 with the
    next step's diagnostics at the same theta). [(rows [J_b, n], log-probs [N_b])] in order."""
    device = batches[0][0].device
    width = max(b[0].shape[1] for b in batches)

    def right_pad(x, n, fill):  # [N_b, n - pad] -> [N_b, n]
        return torch.cat([x, torch.full((x.shape[0], n - x.shape[1]), fill, dtype=x.dtype, device=x.device)], 1)

    seqs = torch.cat([right_pad(b[0], width, 0) for b in batches]).to(device)
    attn = torch.cat([right_pad(b[1], width, 0) for b in batches]).to(device)
    mask = torch.cat([right_pad(b[2], width - 1, False) for b in batches]).to(device)
    C_all = torch.block_diag(*[b[3].to(device, torch.float32) for b in batches])  # [J, N]
    current = torch.cat([torch.full((b[0].shape[0],), b[4] is None, device=device) for b in batches])  # [N]
    ref_all = torch.cat([torch.zeros(b[0].shape[0], device=device) if b[4] is None else b[4].to(device, torch.float32)
                         for b in batches])
    rows, logp = _combined(model, params, seqs, attn, mask, C_all, ref_all, current, temperature, shared_prefix)
    out, j, k = [], 0, 0
    for b in batches:
        J, N = b[3].shape
        out.append((rows[j:j + J], logp[k:k + N]))
        j, k = j + J, k + N
    return out


def _combined(model, params, seqs, attn, mask, C_all, ref_all, current, temperature: float, shared_prefix: bool):
    """The body of ``batched_gradients`` on one concatenated batch: coefficients C_all [J, N],
    reference log-probs ref_all [N], used where ``current`` [N] is False (else the current log-prob)."""
    n_params = sum(p.numel() for p in params)
    has_tokens = mask.any(-1)
    live = (C_all != 0).any(0) & has_tokens  # [N] the sequences a row depends on
    logp_out = torch.where(has_tokens, torch.nan, 0.0).to(seqs.device, torch.float32)
    if not bool(torch.isfinite(ref_all[live & ~current]).all()):
        raise ValueError("ref_logp: not finite for a sequence with a non-zero coefficient")
    if not bool(live.any()):
        return torch.zeros(C_all.shape[0], n_params, device=seqs.device), logp_out
    keep = live.nonzero().squeeze(-1)
    seqs, attn, mask, C = seqs[keep], attn[keep], mask[keep], C_all[:, keep]
    ref_all, current = ref_all[keep], current[keep]
    owners = _linear_owners(model, params)
    modules = list({id(m): m for m, _ in owners}.values()) if owners is not None else []
    seen: dict[int, list] = {id(m): [] for m in modules}

    @contextlib.contextmanager
    def record():  # every call of the subset's layers: (input, output, their versions at the call)
        hooks = [m.register_forward_hook(lambda mod, inputs, output: seen[id(mod)].append(
            (inputs[0], output, inputs[0]._version, output._version))) for m in modules]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    got = _shared_prefix_logp(model, modules, seqs, attn, mask, temperature, record()) \
        if shared_prefix and owners is not None else None
    if got is None:
        for v in seen.values():
            v.clear()
        with record(), (_autograd_from(modules) if owners is not None else contextlib.nullcontext()):
            seq_logp = _sequence_logp(model, seqs, attn, mask, temperature)  # [N]
        shape = tuple(seqs.shape)
    else:
        seq_logp, shape = got
    ref = torch.where(current, seq_logp.detach(), ref_all.to(seq_logp.dtype))
    weight = torch.exp(seq_logp - ref)  # 1 at the current theta, with gradient grad log pi
    N = weight.shape[0]
    logp_out[keep] = seq_logp.detach().to(logp_out.dtype)

    def per_sequence(calls) -> bool:  # one call on [N, L, .] activations, neither changed in place since
        if len(calls) != 1:
            return False
        inp, out, v_in, v_out = calls[0]
        return (out.requires_grad and inp.dim() == out.dim() == 3 and tuple(inp.shape[:2]) == tuple(out.shape[:2])
                == shape and inp._version == v_in and out._version == v_out)

    once = owners is not None and all(per_sequence(v) for v in seen.values())
    if once:
        outputs = [seen[id(m)][0][1] for m in modules]
        deltas = dict(zip([id(m) for m in modules],
                          torch.autograd.grad(weight.sum(), outputs, allow_unused=True)))
        blocks = []
        for (mod, kind), p in zip(owners, params):
            delta = deltas[id(mod)]
            if delta is None:  # the sequences' log-probs do not depend on this layer
                blocks.append(torch.zeros(C.shape[0], p.numel(), device=C.device))
                continue
            d = delta.reshape(N, -1, delta.shape[-1]).float()  # [N, L, out]
            if kind == "bias":
                blocks.append(C @ d.sum(1))
                continue
            inp = seen[id(mod)][0][0].detach()
            x = inp.reshape(N, -1, inp.shape[-1]).float()  # [N, L, in]
            if N * p.numel() <= PER_SEQUENCE_BUDGET:  # every sequence's gradient [N, out * in], then the rows
                blocks.append(C @ torch.einsum("nlo,nli->noi", d, x).reshape(N, -1))
            else:  # row by row, sum_k,t (C_jk delta_k,t) x_k,t^T: one [N L, out] array at a time
                xs = x.flatten(0, 1)  # [N L, in]
                blocks.append(torch.stack([((C[j][:, None, None] * d).flatten(0, 1).T @ xs).flatten()
                                           for j in range(C.shape[0])]))
        return torch.cat(blocks, 1), logp_out
    rows = []
    for j in range(C.shape[0]):
        g = torch.autograd.grad((C[j].to(weight.dtype) * weight).sum(), params, retain_graph=j < C.shape[0] - 1,
                                allow_unused=True)
        rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).float()
                               for x, p in zip(g, params)]))
    return torch.stack(rows), logp_out


def prompt_rows(coeff: torch.Tensor) -> torch.Tensor:
    """coeffs [P, N] of the per-prompt estimates g_i = (1/G) sum_g c_ig grad w_ig (``combined_gradients``):
    row i holds c_i / G on prompt i's G sequences (prompt-major), 0 elsewhere. coeff [P, G]."""
    P, G = coeff.shape
    rows = torch.zeros(P, P, G, dtype=torch.float64)
    rows[torch.arange(P), torch.arange(P)] = coeff.double().cpu() / G
    return rows.reshape(P, P * G)


def per_prompt_gradients(model, params, seqs, attn, mask, coeff: torch.Tensor, temperature: float = 1.0,
                         ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt gradient estimates on ``params``: ([P, n], sequence log-probs [N]), N = P G sequences
    in prompt-major order.

    g_i = -grad of L_i = (1/G) sum_g c_ig exp(log pi(y_ig) - ref_ig), log pi(y_ig) the sequence
    log-probability at ``temperature``. With ref = log pi at the current theta (the default)
    g_i = (1/G) sum_g c_ig grad log pi(y_ig), with c = R - mean_g R an estimate of grad J_i =
    E[(r - mu) grad log pi]; with ref from an earlier theta the same samples are importance-weighted,
    so the difference of the two estimates follows the whole Hessian of J_i, E[(r - mu)(s s^T + grad s)],
    along the step."""
    return combined_gradients(model, params, seqs, attn, mask, prompt_rows(coeff), temperature, ref_logp)


def half_group_rows(rewards: torch.Tensor, ddof: int, eps: float) -> torch.Tensor | None:
    """The measured gain's coefficients [3, N] for ``combined_gradients`` (rewards [P, G] of the
    N = P G sequences, prompt-major); None when G < 4 (halves of fewer than 2 samples).

    The first G//2 samples of every prompt give each estimator's update u_E = (1/P) sum_i (1/G_A)
    sum_g A^E_ig grad log pi(y_ig) (advantages of that half alone; rows 1 and 2: GRPO, REINFORCE),
    the other half an independent estimate g_B of grad J (mean baseline; row 0), so g_B . u_E
    estimates the first-order one-step change of J along E's update (unbiased: the halves are
    independent given theta); ``gain_from_rows`` takes their ratio."""
    P, G = rewards.shape
    half = G // 2
    if half < 2:
        return None
    r = rewards.double().cpu()
    r_a, r_b = r[:, :half], r[:, half:]
    rows = torch.zeros(3, P, G, dtype=torch.float64)
    rows[0, :, half:] = (r_b - r_b.mean(-1, keepdim=True)) / (P * (G - half))
    for j, name in ((1, "grpo"), (2, "reinforce")):
        rows[j, :, :half] = estimators.advantages(name, r_a, ddof=ddof, eps=eps) / (P * half)
    return rows.reshape(3, P * G)


def gain_from_rows(rows: torch.Tensor | None) -> tuple[float, str]:
    """(gain, reason) from the gradients [3, n] of ``half_group_rows`` (None: G < 4): gain =
    (g_B . u_GRPO) / (g_B . u_REINFORCE) at equal lr, on the diagnostic subset, the simulator's
    measured gain (sim.step_gain) with the first-order change in place of the exact one. NaN with a
    reason where undefined ("group_too_small": G < 4; "reinforce_not_improving": g_B . u_REINFORCE <= 0)."""
    if rows is None:
        return math.nan, "group_too_small"
    g_b, u_grpo, u_reinforce = rows.double()
    change = {"grpo": float(g_b @ u_grpo), "reinforce": float(g_b @ u_reinforce)}
    if not change["reinforce"] > 0:
        return math.nan, "reinforce_not_improving"
    return change["grpo"] / change["reinforce"], ""


def prompt_and_gain_gradients(model, params, seqs, attn, mask, rewards: torch.Tensor, ddof: int, eps: float,
                              temperature: float = 1.0, gain: bool = True, also=()):
    """The diagnostics' gradients at theta_t from one ``combined_gradients`` call (rewards [P, G] of
    the N = P G sequences, prompt-major): (g [P, n], the per-prompt estimates of
    ``per_prompt_gradients`` with the mean baseline; sequence log-probs [N]; and with ``gain`` the
    measured gain ``gain_from_rows(half_group_rows)`` as (gain, reason), else None), followed by
    the (rows, log-probs) of every batch in ``also``, run in the same forward (``batched_gradients``)."""
    halves = half_group_rows(rewards, ddof, eps) if gain else None
    coeffs = prompt_rows(rewards - rewards.mean(-1, keepdim=True))
    (rows, seq_logp), *others = batched_gradients(
        model, params, [(seqs, attn, mask, coeffs if halves is None else torch.cat([coeffs, halves]), None), *also],
        temperature)
    P = rewards.shape[0]
    return (rows[:P], seq_logp, (gain_from_rows(rows[P:] if halves is not None else None) if gain else None),
            *others)


def empirical_m(smooth: torch.Tensor, sigma: torch.Tensor, dtheta: float, theta_norm: float) -> float:
    """max_i smooth_i / sigma_i over the prompts with sigma_i > 0 (0 when there is none), smooth_i =
    ||g_i(theta_t+1) - g_i(theta_t)|| / ||theta_t+1 - theta_t||; NaN when the update moved theta by
    no more than float32 rounding (||dtheta|| <= 1e-6 ||theta||: a skipped or zero-lr step), where
    the quotient would be rounding noise over nothing."""
    if not dtheta > 1e-6 * theta_norm:
        return math.nan
    live = sigma > 0
    return float((smooth[live] / sigma[live]).max()) if live.any() else 0.0


def phase_labels(steps: pd.DataFrame, diagnosed: pd.Series) -> pd.Series:
    """The phase of every diagnosed step (theory.label_phases on sigma_bar, rho and the measured gain,
    persisting in training steps), None on the others: the same rule as the simulator's."""
    labels = pd.Series([None] * len(steps), index=steps.index, dtype=object)
    diag = steps[diagnosed]
    if len(diag):
        labels[diag.index] = theory.label_phases(diag["sigma_bar"].to_numpy(), diag["rho"].to_numpy(),
                                                 diag["gain"].to_numpy(dtype=float), steps=diag["step"].to_numpy())
    return labels


def run_summary(steps: pd.DataFrame) -> dict:
    """One run's summary from its steps: initial_J / final_J (mean reward over the first / last fifth
    of the steps), auc (mean reward), the last predicted_gain and the phases met, in order."""
    k = max(1, len(steps) // 5)
    return {"initial_J": float(steps["J"].iloc[:k].mean()), "final_J": float(steps["J"].iloc[-k:].mean()),
            "auc": float(steps["J"].mean()), "predicted_gain": float(steps["predicted_gain"].iloc[-1]),
            "phases": ",".join(dict.fromkeys(steps["phase"].dropna())) if "phase" in steps else ""}


class Trainer:
    """One run: holds the model, optimizer and accelerate state; `run()` trains and logs."""

    def __init__(self, cfg: LLMConfig, out: Path, accelerator=None, log=print):
        from accelerate import Accelerator

        validate(cfg)
        self.cfg, self.out, self.log = cfg, Path(out), log
        cpu = resolve_device(cfg.device) == "cpu"
        self.acc = accelerator or Accelerator(cpu=cpu)
        dtype = torch.bfloat16 if (not cpu and torch.cuda.is_bf16_supported()) else None
        model, self.tok = model_mod.load(cfg.model, device="cpu", dtype=dtype)
        self.examples = data_mod.load_data(cfg.data, difficulty=cfg.difficulty, seed=cfg.seed)
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD
        torch.manual_seed(cfg.seed)
        optimizer = opt_cls(model.parameters(), lr=cfg.lr)
        self.model, self.opt = self.acc.prepare(model, optimizer)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if cfg.prompts_per_step % self.world:
            raise ConfigError(f"prompts-per-step: {cfg.prompts_per_step} is not divisible by {self.world} processes")
        self.diag = diag_parameters(self.acc.unwrap_model(self.model), cfg.diag_params)
        self.proj = None
        # an adaptive estimator's state across steps (sim.estimators.PromptStates; None: stateless)
        spec = estimators.get(cfg.estimator)
        self.adaptive = estimators.PromptStates(cfg.estimator, cfg.ddof, cfg.eps) if spec.adaptive else None

    # -- one step -------------------------------------------------------------------------
    def _prompts(self, step: int):
        rng = random.Random(f"{self.cfg.seed}-{step}")
        batch = [self.examples[rng.randrange(len(self.examples))] for _ in range(self.cfg.prompts_per_step)]
        return batch, batch[self.rank::self.world]

    @torch.no_grad()
    def _generate(self, local, step: int):
        cfg, tok = self.cfg, self.tok
        tok.padding_side = "left"
        enc = tok([e.prompt for e in local], return_tensors="pt", padding=True).to(self.acc.device)
        torch.manual_seed(hash((cfg.seed, step, self.rank)) % 2**31)
        model = self.acc.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        seqs = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                              max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.group_size,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        model.train(was_training)
        attn = enc.attention_mask.repeat_interleave(cfg.group_size, 0)
        attn = torch.cat([attn, torch.ones_like(seqs[:, attn.shape[1]:])], 1)
        texts = tok.batch_decode(seqs[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        return seqs, attn, enc.input_ids.shape[1], texts

    def _advantages(self, rewards_local: torch.Tensor, batch: list | None = None,
                    rho: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather [P, G] rewards from all ranks, compute advantages of the whole batch with
        sim.estimators.advantages (an adaptive estimator: its PromptStates, keyed by the prompts of
        ``batch``, the step's examples), return (all rewards [P, G], local advantages [P_local, G])."""
        gathered = self.acc.gather(rewards_local.to(self.acc.device)).cpu()  # [P, G] in rank-major order
        P_loc = rewards_local.shape[0]
        if self.adaptive is None:
            adv = estimators.advantages(self.cfg.estimator, gathered.double(), ddof=self.cfg.ddof, eps=self.cfg.eps)
        else:  # rank r holds batch[r::world] (_prompts): the gathered rows' prompts in rank-major order
            if batch is None:
                raise ValueError(f"{self.cfg.estimator} keeps a state per prompt: pass the step's examples")
            keys = [e.prompt for r in range(self.world) for e in batch[r::self.world]]
            adv = self.adaptive(gathered.double(), keys, rho)
        return gathered, adv[self.rank * P_loc:(self.rank + 1) * P_loc].float()

    def _projected(self, g: torch.Tensor) -> torch.Tensor:
        """Per-prompt gradients [P, n] randomly projected to --diag-proj dimensions (as they are when 0)."""
        if not self.cfg.diag_proj:
            return g
        if self.proj is None:
            gen = torch.Generator().manual_seed(self.cfg.seed + 7)
            self.proj = (torch.randn(g.shape[1], self.cfg.diag_proj, generator=gen)
                         / math.sqrt(self.cfg.diag_proj)).to(g.device)
        return g @ self.proj

    def _param_vector(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in self.acc.unwrap_model(self.model).parameters()])

    def step(self, step: int) -> dict:
        """One policy-gradient step; on diagnostic steps also rho_t over the per-prompt gradients and
        the empirical M: max_i ||g_i(theta_t+1) - g_i(theta_t)|| / ||theta_t+1 - theta_t|| / sigma_i,
        g_i the mean-baseline gradient estimate of `per_prompt_gradients` on the subset, evaluated at
        theta_t+1 on the same samples importance-weighted. For an autoregressive policy the score
        depends on y through its own derivative, Hess J_i = E[(r - mu)(s s^T + grad s)]; this
        measures that whole Hessian along the update (its rows in the subset), not the
        third-moment form of the log-linear case (DESIGN.md §7). Both use rank 0's prompts only
        under DDP."""
        cfg = self.cfg
        batch, local = self._prompts(step)
        t0 = time.perf_counter()
        seqs, attn, plen, texts = self._generate(local, step)
        rewards_local = torch.tensor([reward(t, e.answer, e.kind) for t, e in
                                      zip(texts, [e for e in local for _ in range(cfg.group_size)])],
                                     dtype=torch.float64).reshape(len(local), cfg.group_size)
        mask = completion_mask(seqs, plen, self.tok.eos_token_id, self.tok.pad_token_id)
        diagnose = cfg.diag_every and step % cfg.diag_every == 0
        t_diag = 0.0
        centred = rewards_local - rewards_local.mean(-1, keepdim=True)  # [P_loc, G]
        # an estimator that reads rho_t (grpo_phase) needs the per-prompt gradients at every step,
        # the diagnostics on their steps: one computation at theta_t serves both
        needs_rho = self.adaptive is not None and self.adaptive.spec.adaptive.needs_rho
        rho_now = None
        model, params = self.acc.unwrap_model(self.model), [p for _, p in self.diag]
        if diagnose or needs_rho:
            td = time.perf_counter()
            with eval_mode(model):
                g_raw, logp_before, gain = prompt_and_gain_gradients(model, params, seqs, attn, mask, rewards_local,
                                                                     cfg.ddof, cfg.eps, cfg.temperature, gain=diagnose)
            g_before = self._projected(g_raw)
            if needs_rho:  # every rank's prompts (gathered: every pair counts, and all ranks take one
                # alpha), over the pairs of non-zero gradients
                g_all = self.acc.gather(g_before.contiguous()).double().cpu()  # [P, d]
                rho_now = theory.gradient_orthogonality(g_all @ g_all.T, live_only=True)
            t_diag += time.perf_counter() - td
        rewards, adv = self._advantages(rewards_local, batch, rho_now)
        if diagnose:
            td = time.perf_counter()
            theta_before = self._param_vector()
            t_diag += time.perf_counter() - td
        logp = token_logprobs(self.model, seqs, attn, cfg.temperature)
        global_tokens = None
        if cfg.loss_agg == "token-mean" and self.world > 1:
            global_tokens = float(self.acc.gather(mask.sum().reshape(1).to(self.acc.device)).sum())
        loss = pg_loss(logp, mask, adv.reshape(-1).to(logp.device), cfg.loss_agg, cfg.max_new_tokens,
                       global_tokens, self.world)
        self.opt.zero_grad()
        self.acc.backward(loss)
        finite = bool(torch.isfinite(loss.detach()))
        if self.acc.mixed_precision != "fp16":  # under fp16 loss scaling, inf gradients are skipped steps
            finite &= bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))))
        if not finite:  # the same on every rank under DDP (gradients are all-reduced)
            raise ConfigError(f"lr: training diverged at step {step} (non-finite loss or gradient, before the "
                              f"update); lower --lr (now {cfg.lr:g})")
        self.opt.step()
        sigma = rewards.std(-1, correction=0)  # [P] per-prompt sample std (population form)
        row = {"step": step, "J": float(rewards.mean()), "sigma_bar": float(sigma.mean()),
               "zero_std_frac": float((sigma == 0).double().mean()), "loss": float(loss.detach()),
               "reward_mean_per_prompt": rewards.mean(-1).numpy(), "sigma_per_prompt": sigma.numpy(),
               "diagnosed": bool(diagnose)}
        if diagnose:
            td = time.perf_counter()
            with eval_mode(model):
                g_after = self._projected(per_prompt_gradients(model, params, seqs, attn, mask, centred,
                                                               cfg.temperature, ref_logp=logp_before)[0])
            dtheta = (self._param_vector() - theta_before).norm()
            gram = (g_before.double() @ g_before.double().T)
            row["rho"] = float(theory.gradient_orthogonality(gram))
            sig_loc = sigma[self.rank * len(local):(self.rank + 1) * len(local)]
            smooth = (g_after - g_before).norm(dim=-1).double().cpu() / float(dtheta.clamp_min(1e-30))  # [P_loc]
            row["empirical_M"] = empirical_m(smooth, sig_loc, float(dtheta), float(theta_before.norm()))
            row["smoothness"] = float(smooth.mean())
            row["gain"], row["gain_undefined"] = gain
            t_diag += time.perf_counter() - td
        row["seconds"] = time.perf_counter() - t0
        row["diag_seconds"] = t_diag
        return row

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        cfg, rid = self.cfg, run_id(self.cfg)
        rows = []
        for step in range(cfg.steps):
            rows.append(self.step(step))
            r = rows[-1]
            if self.acc.is_main_process and (step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1):
                self.log(f"[{cfg.estimator}] step {step}: reward {r['J']:.3f}, sigma_bar {r['sigma_bar']:.3f}, "
                         f"zero-std {r['zero_std_frac']:.2f}" + (f", rho {r['rho']:.2f}" if "rho" in r else ""))
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                self.save(self.out / f"checkpoint-{step + 1}")
        self.save(self.out / "final")
        steps = self._steps_frame(rows, rid)
        runs = self._runs_frame(steps, rid)
        if self.acc.is_main_process:
            write_manifest(self.out, {"llm": dataclasses.asdict(cfg)}, [{"run_id": rid, **dataclasses.asdict(cfg)}],
                           kind="llm", world_size=self.world)
            write_parquet(steps, self.out / "steps.parquet")
            write_parquet(runs, self.out / "runs.parquet")
        self.acc.wait_for_everyone()
        return runs, steps

    def save(self, path: Path) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.acc.unwrap_model(self.model).save_pretrained(path)
            self.tok.save_pretrained(path)

    def _steps_frame(self, rows: list[dict], rid: str) -> pd.DataFrame:
        df = pd.DataFrame(rows)
        df.insert(0, "run_id", rid)
        sigma_bound = theory.reward_std_bound(0.0, 1.0)  # rewards in [0, 1]: the largest possible std
        # predicted gain so far: sigma_bound / running mean of sigma_bar (theory.predicted_gain)
        sb = torch.tensor(df["sigma_bar"].to_numpy())
        running_mean = sb.cumsum(0) / torch.arange(1, len(sb) + 1, dtype=sb.dtype)  # sigma_bar over steps <= t
        df["predicted_gain"] = theory.predicted_gain(running_mean[:, None, None], sigma_bound).numpy()
        if df["diagnosed"].any():
            df["phase"] = phase_labels(df, df["diagnosed"])
        return df

    def _runs_frame(self, steps: pd.DataFrame, rid: str) -> pd.DataFrame:
        row = {"run_id": rid, **dataclasses.asdict(self.cfg), "world_size": self.world, **run_summary(steps),
               "step_seconds": float(steps["seconds"].mean()),
               "diag_overhead": float(steps["diag_seconds"].sum() / max(steps["seconds"].sum()
                                                                        - steps["diag_seconds"].sum(), 1e-9))}
        if "empirical_M" in steps:
            row["empirical_M"] = float(steps["empirical_M"].max())
        return pd.DataFrame([row])
