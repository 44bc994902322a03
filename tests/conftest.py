import os

from hypothesis import settings

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Hypothesis profiles: "default" keeps the suite fast; HYPOTHESIS_PROFILE=thorough explores more.
settings.register_profile("default", max_examples=60)
settings.register_profile("thorough", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
