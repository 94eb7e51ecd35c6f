"""Physically faithful simulator of MS/NMOSD cohorts (anatomy -> chi -> field -> GRE, FLAIR).

Public entry points:

- :func:`training.simulate.anatomy.build_anatomy`: a head (MNI152 2009 or procedural) with
  tissue susceptibility, R2*, proton density, FLAIR contrast and labels.
- :func:`training.simulate.cohort.plan_cohort`: the cohort's tables (participants, sessions,
  lesions with ground truth and simulated reader calls) without rendering any image.
- :func:`training.simulate.cohort.simulate_scan`: one session rendered in memory.
- :func:`training.simulate.cohort.simulate_cohort`: a whole BIDS dataset on disk.

Every knob, with its literature source, is listed in ``docs/simulator.md``.
"""

import importlib

__all__ = ["LABELS", "Anatomy", "build_anatomy", "PRESETS", "CohortPreset", "get_preset",
           "simulate_cohort", "simulate_scan", "plan_cohort"]


_WHERE = {"LABELS": "anatomy", "Anatomy": "anatomy", "build_anatomy": "anatomy",
          "PRESETS": "presets", "CohortPreset": "presets", "get_preset": "presets",
          "simulate_cohort": "cohort", "simulate_scan": "cohort", "plan_cohort": "cohort"}


def __getattr__(name):  # lazy: keep `import training.simulate` light
    if name in _WHERE:
        return getattr(importlib.import_module(f"training.simulate.{_WHERE[name]}"), name)
    raise AttributeError(name)
