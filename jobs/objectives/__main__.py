"""`python -m jobs.objectives`: the registered train objectives, one line (what `make objectives` runs)."""

from jobs.objectives import OBJECTIVES

print(" ".join(OBJECTIVES))
