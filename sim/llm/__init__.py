"""LLM-scale runner (DESIGN.md §7): GRPO vs REINFORCE on Hugging Face causal LMs with the
simulator's estimators (sim.estimators) and diagnostics (theory/). Only sim.cli imports this.

Modules: data (arithmetic generator, GSM8K/MATH loaders), rewards (verifiable answer checks),
model (tokenizer, tiny Llama, loading), trainer (sampling, policy-gradient step, diagnostics).
"""
