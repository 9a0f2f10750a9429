"""The train objectives, one class each (`base.Objective`), in one registry: `train.objective` names one.

A new objective is a module beside these and one line below; `python -m jobs.objectives` lists them (the
Makefile's `make objectives` reads it).
"""

from __future__ import annotations

from jobs.objectives.base import Objective
from jobs.objectives.logit import Logit
from jobs.objectives.on_policy import OnPolicy
from jobs.objectives.sft import SFT
from jobs.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective", [SFT, Logit, OnPolicy])
