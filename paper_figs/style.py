"""One style for every figure: Okabe-Ito colour-blind-safe palette, fonts legible at single
column width (3.4 in), labelled axes. Use ``apply_style()`` (an rc context) and the
``ESTIMATOR_STYLE`` map so an estimator looks the same in every figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

from contextlib import contextmanager  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402

#: Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7"}

ESTIMATOR_STYLE = {
    "reinforce": {"color": OKABE_ITO["black"], "linestyle": "-", "marker": "o", "label": "REINFORCE"},
    "grpo": {"color": OKABE_ITO["vermillion"], "linestyle": "-", "marker": "s", "label": "GRPO"},
    "dr_grpo": {"color": OKABE_ITO["blue"], "linestyle": "--", "marker": "^", "label": "Dr. GRPO"},
    "rloo": {"color": OKABE_ITO["green"], "linestyle": "-.", "marker": "v", "label": "RLOO"},
    "grpo_batch": {"color": OKABE_ITO["purple"], "linestyle": ":", "marker": "D", "label": "GRPO (batch std)"},
    "grpo_oracle": {"color": OKABE_ITO["orange"], "linestyle": "--", "marker": "P", "label": "GRPO (true sigma)"},
    "grpo_phase": {"color": OKABE_ITO["green"], "linestyle": "-", "marker": "h", "label": "GRPO (phase-aware)"},
    "grpo_finite": {"color": OKABE_ITO["blue"], "linestyle": "-", "marker": "*", "label": "GRPO (finite-G corrected)"},
    "grpo_shrunk": {"color": OKABE_ITO["sky"], "linestyle": "-", "marker": "X", "label": "GRPO (shrunk baseline)"},
    "grpo_selfnorm": {"color": OKABE_ITO["orange"], "linestyle": "-", "marker": "d",
                      "label": "GRPO (raw std, hard-side cap lifted)"},
}
SEQUENCE = [OKABE_ITO[c] for c in ("blue", "vermillion", "green", "orange", "purple", "sky", "black")]

SINGLE_COLUMN = 3.4  # inches
DOUBLE_COLUMN = 7.0

RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.2, "lines.markersize": 3.5, "savefig.dpi": 300, "figure.dpi": 150,
    "savefig.bbox": "tight", "pdf.fonttype": 42, "ps.fonttype": 42, "axes.grid": False,
}


@contextmanager
def apply_style():
    with plt.rc_context(RC):
        yield


def estimator_style(name: str) -> dict:
    """Colour, line, marker and label of an estimator; others (presets) get a neutral style and
    their registry label."""
    if name in ESTIMATOR_STYLE:
        return ESTIMATOR_STYLE[name]
    from sim.estimators import REGISTRY

    label = REGISTRY[name].label if name in REGISTRY else name
    return {"color": OKABE_ITO["sky"], "linestyle": "-", "marker": "x", "label": label}
