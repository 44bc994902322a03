"""What the theory says about one problem, next to what the simulator measures on it.

``check`` evaluates the theorem conditions (theory.conditions) at theta_0 and along the exact
trajectories of GRPO and REINFORCE at their theory step sizes; ``predict`` reports the M-bounds,
safe step sizes, predicted gain and rate bounds, the one-step decomposition at theta_0, and
the measured speedup of the same runs. Both return plain dicts (JSON-ready); sim.cli prints them.
"""

from __future__ import annotations

import dataclasses

import torch

import theory
from sim.config import ProblemConfig, RunConfig, TrainConfig
from sim.engine import train_batch
from sim.problems import make_problem


def _exact_runs(problem: ProblemConfig, steps: int) -> dict[str, object]:
    """Exact-mode GRPO and REINFORCE at their theory step sizes (log every step)."""
    prob = make_problem(problem)
    out = {}
    for est in ("reinforce", "grpo"):
        lr = float(prob.theory_lr(est == "grpo"))
        run = RunConfig(problem, TrainConfig(estimator=est, mode="exact", steps=steps, lr=lr, lr_rule="theory",
                                             log_points=steps + 1, eps=0.0))
        out[est] = train_batch([run])
    return out


def _theta0_quantities(problem: ProblemConfig) -> dict[str, torch.Tensor]:
    prob = make_problem(problem)
    P, K = prob.bias.shape
    tp = torch.zeros(P, prob.phi_private.shape[-1], dtype=prob.bias.dtype)
    ts = torch.zeros(prob.phi_shared.shape[-1], dtype=prob.bias.dtype)
    pi, mu, sigma, w = theory.prompt_stats(theory.logits(prob.bias, prob.phi_private, prob.phi_shared, tp, ts),
                                           prob.rbar)
    phi_loc = theory.local_features(prob.phi_private, prob.phi_shared)
    d, H = theory.prompt_curvature(pi, prob.rbar, mu, phi_loc)
    g = theory.prompt_gradient(pi, prob.rbar, mu, d)
    return {"prob": prob, "pi": pi, "mu": mu, "sigma": sigma, "d": d, "H": H, "g": g, "tp": tp, "ts": ts,
            "phi_loc": phi_loc}


def check(problem: ProblemConfig, steps: int = 200) -> dict:
    """Condition table for ``problem``: each condition with holds / measured / threshold."""
    q = _theta0_quantities(problem)
    prob = q["prob"]
    overlap = theory.feature_overlap(prob.phi_private, prob.phi_shared)
    runs = _exact_runs(problem, steps)
    conds = [theory.orthogonality_condition(overlap)]
    emp0 = theory.hessian_over_sigma(q["H"], q["sigma"])
    conds.append(dataclasses.replace(theory.m_bound_condition(emp0, theory.m_fourth_moment(q["pi"], q["d"])),
                                     name="M-bound at theta_0"))
    grad_ok = bool((q["g"].norm(dim=-1) <= theory.gradient_bound(q["pi"], q["d"], q["sigma"]) * (1 + 1e-9)
                    + 1e-15).all())
    conds.append(theory.Condition("gradient bound at theta_0", grad_ok,
                                  float((q["g"].norm(dim=-1) / theory.gradient_bound(q["pi"], q["d"], q["sigma"])
                                         .clamp_min(1e-300)).max()), 1.0,
                                  "||grad J_i|| <= sigma_i sqrt(E||phi - phibar||^2)"))
    for est, res in runs.items():
        row = res.runs.iloc[0]
        worst = float(res.steps["m_bound_ratio"].max())
        conds.append(theory.Condition(f"M-bound along {est}", worst <= 1 + 1e-9, worst, 1.0,
                                      "max over steps and prompts of (||Hess J_i|| / sigma_i) / M_i(theta)"))
        conds.append(dataclasses.replace(theory.step_size_condition(float(row["lr"]), float(row["lr_theory"])),
                                         name=f"step size ({est})"))
        conds.append(dataclasses.replace(theory.relaxed_condition(float(row["min_sigma_ratio"])),
                                         name=f"relaxed sigma along {est}"))
    return {"problem": dataclasses.asdict(problem), "steps": steps,
            "feature_overlap_max": float(overlap.max()),
            "rho_theta0": float(runs["grpo"].steps["rho"].iloc[0]),
            "conditions": [c.as_dict() for c in conds],
            "all_hold": all(c.holds for c in conds)}


def predict(problem: ProblemConfig, steps: int = 500) -> dict:
    """M-bounds, safe steps, predicted gain and rate bounds beside the measured speedup."""
    q = _theta0_quantities(problem)
    prob = q["prob"]
    P = problem.num_prompts
    M = float(prob.curvature_bound)
    smax = float(prob.sigma_bound)
    runs = _exact_runs(problem, steps)
    g_row, r_row = runs["grpo"].runs.iloc[0], runs["reinforce"].runs.iloc[0]
    both = bool(g_row["reached_target"]) and bool(r_row["reached_target"])
    measured = max(int(r_row["steps_to_target"]), 1) / max(int(g_row["steps_to_target"]), 1)
    sigma_bar = float(g_row["sigma_bar_to_target"])
    delta_j = float(prob.rbar.amax(-1).mean() - q["mu"].mean())
    t_ref = max(int(g_row["steps_to_target"]), 1)
    bound_r, bound_g = theory.rate_bounds(t_ref, M, delta_j, smax, sigma_bar)
    emp = theory.hessian_over_sigma(q["H"], q["sigma"])
    dec = theory.step_decomposition(prob.bias, prob.rbar, prob.phi_private, prob.phi_shared, q["tp"], q["ts"],
                                    theory.step_scale(True, M, smax, P, q["sigma"]))
    return {
        "problem": dataclasses.asdict(problem), "steps": steps,
        "M": {"global_4B2": theory.global_curvature_bound(prob.feature_norm_bound), "curvature_constant (used)": M,
              "fourth_moment_theta0_max": float(theory.m_fourth_moment(q["pi"], q["d"]).max()),
              "directional_theta0_max": float(theory.m_directional(q["pi"], q["d"], q["H"]).max()),
              "empirical_hess_over_sigma_theta0_max": float(emp.max())},
        "sigma_theta0": [float(x) for x in q["sigma"]],
        "sigma_bound": smax,
        "step_sizes": {"grpo": float(prob.theory_lr(True)), "reinforce": float(prob.theory_lr(False)),
                       "convention": "lr on the (1/P)-averaged gradient: P/M and P/(M sigma_bound)"},
        "predicted_gain": float(g_row["predicted_gain"]),
        "sigma_bar_grpo_to_target": sigma_bar,
        "rate_bounds_at_grpo_target_step": {"t": t_ref, "reinforce": bound_r, "grpo": bound_g},
        "measured": {"grpo_steps_to_target": int(g_row["steps_to_target"]),
                     "reinforce_steps_to_target": int(r_row["steps_to_target"]),
                     "both_reached": both, "speedup": measured,
                     "target": f"{g_row['target_fraction']:.0%} of J*"},
        "decomposition_theta0_grpo_step": {k: float(v.mean()) for k, v in dec.items()
                                           if k in ("own", "cross", "second", "actual", "remainder",
                                                    "remainder_bound")},
    }
