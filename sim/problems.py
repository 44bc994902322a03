"""Problem family: multi-prompt softmax policies with verifiable binary rewards (DESIGN.md §2).

Dimension legend
    R    runs in a batch (leading dim of a stacked Problem)
    P    prompts (the design's m)
    K    candidate responses per prompt
    k    private feature block size per prompt
    s    shared feature block size

Policy: pi_theta(y | x_i) = softmax_y(b_iy + theta . phi(x_i, y)), with

    phi(x_i, y) = [ sqrt(o) u_(i,y)  in prompt i's private block ; sqrt(1-o) v_(i,y) in the shared block ]

u, v unit vectors, so ||phi|| = 1 for every o. The fixed reference logits b_iy play the
role of a pretrained model: they set the initial success rate p_i(0) at theta = 0 and
carry no parameters, so every formula of DESIGN.md §3 holds unchanged (expectations are
under pi). Features are stored per prompt, phi_private = sqrt(o) u [P, K, k] and
phi_shared = sqrt(1-o) v [P, K, s]; theta is split into a private part [P, k] and a
shared part [s]. Nothing is ever [P, K, P*k + s].

Kinds
    tabular  u_(i,y) = e_y (k = K) and v_(i,y) = e_(pi_i(y)) (s = K): at o = 1 this is
             the tabular multi-prompt bandit phi(x_i, y) = e_(i,y); for o < 1 every prompt
             also shares a one-hot "response identity" block.
    linear   u and v are random Gaussian directions, normalised.

In both kinds response 0 is the correct one, and the shared vector of prompt i's
response y is the row pi_i(y) of one shared table W [K, s], pi_i a random permutation:
prompts whose correct responses map to the same row cooperate, the rest compete.

Losing orthogonality as training goes on (``failure_mode`` = beta > 0): response 1 of every
prompt becomes a hard wrong answer, close to the correct one plus one failure direction f of the
shared block that all prompts share, with a sign e_i = +-1 that splits them in two camps (half
each, at random), so that what suppresses the failure for one camp promotes it for the other:

    phi(x_i, 1) = (beta phi(x_i, 0) + sqrt(1 - beta^2) e_i [0 ; f]) / ||.||.

With one correct response, grad J_i = c p (1 - p) (phi(x_i, 0) - phibar_wrong), phibar_wrong the
pi-mean of the wrong responses' features. Early the K - 1 wrong responses are about equally likely,
so f enters phibar_wrong with weight ~1/(K-1) and the gradients are mostly prompt-specific; the
easy wrong responses (||phi(x_i, 0) - phi(x_i, y)||^2 about 2) are suppressed fast, the hard one
(||phi(x_i, 0) - phi(x_i, 1)||^2 about 2 (1 - beta)) slowly, so late phibar_wrong -> phi(x_i, 1)
and grad J_i -> its direction phi(x_i, 0) - phi(x_i, 1), whose part along -e_i f dominates
every prompt's: |cos| between prompts -> 1 and rho_t falls, while the two camps pull theta_sh
in opposite directions along f. With beta = 0.9 at o = 1, rho_t goes from about 0.9 to below 0.25
(README 'What the simulator shows').

Rewards: r(x_i, y) in {0, c_i}; the observed reward is flipped with probability f
(``reward_noise``), so the mean reward is rbar = c_i (1 - f) for the correct response and
c_i f for the others. The flips add variance that carries no curvature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

import theory
from sim.config import ProblemConfig, validate_problem  # noqa: F401 (ProblemConfig: re-exported)

#: logit half-width of difficulty_spread = 1 around the base success rate: logit(0.99).
_SPREAD_HALF_WIDTH = math.log(0.99 / 0.01)


@dataclass(frozen=True)
class Problem:
    """Tensors of one problem ([P, ...]) or of R stacked problems ([R, P, ...]).

    bias   [.., P, K]  reference logits b_iy
    rbar   [.., P, K]  mean reward rbar(x_i, y)
    q      [.., P, K]  probability that the observed reward is c_i (Bernoulli mean)
    scale  [.., P]     reward scale c_i
    phi_private  [.., P, K, k]  sqrt(o) u_(i,y): prompt i's private feature block
    phi_shared   [.., P, K, s]  sqrt(1-o) v_(i,y): the shared feature block
    orthogonality [..]          o
    """

    bias: torch.Tensor
    rbar: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    phi_private: torch.Tensor
    phi_shared: torch.Tensor
    orthogonality: torch.Tensor

    @property
    def j_star(self) -> torch.Tensor:
        """Optimal mean reward mean_i max_y rbar(x_i, y): [..]. Attained in the limit when o > 0."""
        return self.rbar.amax(-1).mean(-1)

    @property
    def sigma_bound(self) -> torch.Tensor:
        """Largest possible within-prompt std of rbar (DESIGN.md's sigma_max):
        max_i (max_y rbar - min_y rbar) / 2 (theory.reward_std_bound). [..]."""
        return theory.reward_std_bound(self.rbar.amin(-1), self.rbar.amax(-1)).amax(-1)

    @property
    def feature_norm_bound(self) -> float:
        """B = max ||phi(x_i, y)||; 1 by construction (unit u, v; o + (1 - o) = 1)."""
        return 1.0

    @property
    def curvature_bound(self) -> torch.Tensor:
        """M = max_i M_i (theory.curvature_constant): ||Hess J_i|| <= M sigma_i at every theta;
        diam_i^2 / 4 for the family's two-valued rewards (at most B^2 = 1; 1/2 for tabular
        features), diam_i^2 / 2 for a prompt with more reward values. [..]."""
        return theory.curvature_constant(theory.local_features(self.phi_private, self.phi_shared),
                                         self.rbar).amax(-1)

    def to(self, device) -> "Problem":
        """The same problem with every tensor on ``device``."""
        return Problem(**{f.name: getattr(self, f.name).to(device) for f in fields(Problem)})

    def theory_lr(self, std_normalized: bool) -> torch.Tensor:
        """Ascent-lemma learning rate (engine convention, theory.theory_step_size): [..]."""
        return theory.theory_step_size(std_normalized, self.curvature_bound, self.sigma_bound, self.bias.shape[-2])


def initial_success_rates(cfg: ProblemConfig, rng: np.random.Generator) -> np.ndarray:
    """p_i(0), [P]: logit(p_i) spread over logit(base) +- spread * logit(0.99)."""
    centre = math.log(cfg.base_success / (1 - cfg.base_success))
    half = cfg.difficulty_spread * _SPREAD_HALF_WIDTH
    if cfg.difficulty_layout == "even":
        pos = np.linspace(-1.0, 1.0, cfg.num_prompts) if cfg.num_prompts > 1 else np.zeros(1)
    else:
        pos = rng.uniform(-1.0, 1.0, cfg.num_prompts)
    return 1.0 / (1.0 + np.exp(-(centre + half * pos)))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


#: The arrays of a problem file (save_problem / load_problem_arrays), with their shapes.
PROBLEM_ARRAYS = {"bias": "P K", "q": "P K", "scale": "P", "phi_private": "P K k", "phi_shared": "P K s"}


def problem_from_arrays(bias, q, scale, phi_private, phi_shared, dtype: torch.dtype = torch.float64) -> Problem:
    """A Problem from arrays of your own: reference logits bias [P, K], q [P, K] the probability that
    response y's observed reward is c_i (else 0), scale [P] = c_i > 0, features phi_private [P, K, k]
    and phi_shared [P, K, s] (DESIGN.md §2; rbar = c q). ValueError naming the array on bad input."""
    arrs = {"bias": bias, "q": q, "scale": scale, "phi_private": phi_private, "phi_shared": phi_shared}
    arrs = {k: np.asarray(v, dtype=np.float64) for k, v in arrs.items()}
    dims: dict[str, int] = {}
    for name, legend in PROBLEM_ARRAYS.items():
        a = arrs[name]
        if a.ndim != len(legend.split()):
            raise ValueError(f"{name}: expected shape [{', '.join(legend.split())}], got {list(a.shape)}")
        for d, n in zip(legend.split(), a.shape):
            if dims.setdefault(d, n) != n:
                raise ValueError(f"{name}: dimension {d} is {n}, but {dims[d]} in the arrays before it")
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: holds NaN or infinite values")
    if dims["K"] < 2 or dims["P"] < 1:
        raise ValueError(f"bias: needs at least 1 prompt and 2 responses, got shape [{dims['P']}, {dims['K']}]")
    if ((arrs["q"] < 0) | (arrs["q"] > 1)).any():
        raise ValueError("q: reward probabilities must lie in [0, 1]")
    if (arrs["scale"] <= 0).any():
        raise ValueError("scale: reward scales c_i must be > 0")
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    private_sq = (arrs["phi_private"] ** 2).sum(-1).sum(-1)  # [P]
    shared_sq = (arrs["phi_shared"] ** 2).sum(-1).sum(-1)
    o = float(private_sq.sum() / max(private_sq.sum() + shared_sq.sum(), 1e-300))  # the private weight
    prob = Problem(bias=t(arrs["bias"]), rbar=t(arrs["scale"][:, None] * arrs["q"]), q=t(arrs["q"]),
                   scale=t(arrs["scale"]), phi_private=t(arrs["phi_private"]), phi_shared=t(arrs["phi_shared"]),
                   orthogonality=t(o))
    if float(prob.curvature_bound) <= 1e-12:
        raise ValueError("phi_private: no prompt's features tell its responses apart, so nothing can be learned")
    return prob


def save_problem(prob: Problem, path) -> None:
    """Write ``prob`` (one problem, [P, ...]) as the .npz file that --problem-file reads (no pickle)."""
    np.savez(path, **{k: getattr(prob, k).cpu().numpy() for k in PROBLEM_ARRAYS})


def load_problem_arrays(path) -> dict[str, np.ndarray]:
    """The arrays of a problem file, read without pickle; ValueError (one line) when it is missing,
    not an .npz, or lacks an array."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in PROBLEM_ARRAYS if k not in data.files]
            if missing:
                raise ValueError(f"problem-file: {path} lacks the array(s) {', '.join(missing)} "
                                 f"(needs {', '.join(PROBLEM_ARRAYS)})")
            return {k: np.array(data[k]) for k in PROBLEM_ARRAYS}
    except FileNotFoundError:
        raise ValueError(f"problem-file: no such file {path}") from None
    except IsADirectoryError:
        raise ValueError(f"problem-file: {path} is a directory, not an .npz file") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"problem-file: {path} is not a readable .npz file ({e})") from None
    except ValueError as e:
        if str(e).startswith("problem-file"):
            raise
        if "pickle" in str(e):  # not a zip: numpy would unpickle it, which is refused
            raise ValueError(f"problem-file: {path} is not an .npz file of arrays (reading it would need "
                             "pickle, which is refused)") from None
        raise ValueError(f"problem-file: {path}: {e}") from None


def file_digest(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def resolve_problem_file(cfg: ProblemConfig) -> ProblemConfig:
    """``cfg`` with the shape fields of its problem file and the file's sha256 (recorded with the
    runs, so results of another file never mix): ValueError naming the problem."""
    import dataclasses
    import os

    if not cfg.problem_file:
        return cfg
    path = os.path.abspath(os.path.expanduser(cfg.problem_file))
    arrs = load_problem_arrays(path)
    digest = file_digest(path)
    if cfg.problem_sha256 and cfg.problem_sha256 != digest:
        raise ValueError(f"problem-sha256: {path} has sha256 {digest}, not {cfg.problem_sha256}")
    P, K, k = problem_from_arrays(**arrs).phi_private.shape  # validated here: one line naming a bad array
    return dataclasses.replace(cfg, problem_file=path, problem_sha256=digest, num_prompts=P, num_responses=K,
                               private_dim=k, shared_dim=arrs["phi_shared"].shape[-1])


def make_problem(cfg: ProblemConfig, dtype: torch.dtype = torch.float64) -> Problem:
    """Build the problem tensors of ``cfg`` deterministically from ``cfg.problem_seed`` (or from its
    problem file, checked against its recorded sha256)."""
    if cfg.problem_file:
        arrs = load_problem_arrays(cfg.problem_file)
        if cfg.problem_sha256 and file_digest(cfg.problem_file) != cfg.problem_sha256:
            raise ValueError(f"problem-sha256: {cfg.problem_file} changed since its runs were set up")
        return problem_from_arrays(**arrs, dtype=dtype)
    validate_problem(cfg)
    rng = np.random.default_rng(cfg.problem_seed)
    P, K, k, s = cfg.num_prompts, cfg.num_responses, cfg.k, cfg.s

    p0 = initial_success_rates(cfg, rng)  # [P]
    # one correct response (y = 0): softmax(b_i)_0 = p_i  <=>  b_i0 = logit(p_i) + log(K - 1)
    bias = np.zeros((P, K))
    bias[:, 0] = np.log(p0 / (1 - p0)) + math.log(K - 1)

    # reward scales: log-evenly spaced in [1, c_max], then shuffled so they are not tied to difficulty
    scale = np.exp(np.linspace(0.0, math.log(cfg.reward_scale_spread), P)) if P > 1 else np.ones(1)
    scale = rng.permutation(scale)
    f = cfg.reward_noise
    q = np.full((P, K), f)
    q[:, 0] = 1.0 - f
    rbar = scale[:, None] * q

    perms = np.stack([rng.permutation(K) for _ in range(P)])  # [P, K] shared-row index of each response
    if cfg.kind == "tabular":
        U = np.broadcast_to(np.eye(K), (P, K, K)).copy()
        V = np.eye(K)[perms]  # [P, K, K]
    else:
        U = _unit_rows(rng.standard_normal((P, K, k)))
        W = _unit_rows(rng.standard_normal((K, s)))
        V = W[perms]  # [P, K, s]

    o = cfg.orthogonality
    phi_p, phi_s = math.sqrt(o) * U, math.sqrt(1 - o) * V
    if cfg.failure_mode > 0:  # module docstring: response 1 = beta * correct + the shared failure direction
        beta = cfg.failure_mode
        f = _unit_rows(rng.standard_normal(s)) if cfg.kind == "linear" else np.eye(s)[0]
        camp = rng.permutation(np.where(np.arange(P) % 2 == 0, 1.0, -1.0))[:, None]  # [P, 1]: +f or -f
        new_p = beta * phi_p[:, 0]
        new_s = beta * phi_s[:, 0] + math.sqrt(1 - beta**2) * camp * f
        norm = np.sqrt((new_p**2).sum(-1) + (new_s**2).sum(-1))[:, None]
        phi_p[:, 1], phi_s[:, 1] = new_p / norm, new_s / norm
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    prob = Problem(bias=t(bias), rbar=t(rbar), q=t(q), scale=t(scale), phi_private=t(phi_p),
                   phi_shared=t(phi_s), orthogonality=t(o))
    if float(prob.curvature_bound) <= 1e-12:
        raise ValueError("shared-dim: no prompt's features tell its responses apart (every feature "
                         "difference is 0), so nothing can be learned; raise --orthogonality or --shared-dim")
    return prob


def stack_problems(problems: list[Problem]) -> Problem:
    """Stack R problems of one shape into a batched Problem with leading dim R."""
    return Problem(**{f.name: torch.stack([getattr(p, f.name) for p in problems])
                      for f in fields(Problem)})
