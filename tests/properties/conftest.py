"""Hypothesis profiles for the property tests in this folder.

``HYPOTHESIS_PROFILE`` picks one (default ``ci``):

* ``ci``   -- modest example counts so the whole folder runs in well under a minute on 2 cores;
              still randomised run to run (``derandomize=False``), so CI keeps exploring.
* ``fuzz`` -- 10,000 examples per property, for long local or nightly runs, e.g.
              ``HYPOTHESIS_PROFILE=fuzz .venv/bin/python -m pytest -q tests/properties/test_codec_fuzz.py
              tests/properties/test_codec_bounds.py`` (``make fuzz``).

Tests with an explicit ``@settings(max_examples=...)`` (the simulation-backed one) keep their own count.
Loading a profile sets hypothesis' global default, so it also applies to other ``@given`` tests of the
same session that do not pin their own settings (``tests/test_codecs.py`` pins its own).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "HYPOTHESIS_PROFILE"
CI_MAX_EXAMPLES = 60

settings.register_profile(
    "ci", max_examples=CI_MAX_EXAMPLES, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz", max_examples=10_000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))
