import os

from hypothesis import settings

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Hypothesis profiles: "default" keeps the suite fast; "ci" (picked when CI is set, as .ci/run
# runs) draws the same examples every time so a landing never hinges on luck;
# HYPOTHESIS_PROFILE=thorough explores far more (run it when touching theory/ or the CLI).
settings.register_profile("default", max_examples=60)
settings.register_profile("ci", max_examples=60, derandomize=True, database=None)
settings.register_profile("thorough", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))
