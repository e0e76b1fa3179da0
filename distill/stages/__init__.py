"""The stages of a run: one small module per artifact under the run folder (the layout: distill.runs).

Each module has `run(...)`, which returns the artifact's record and skips the work when the artifact on disk
is up to date; what "up to date" means for each stage (its inputs) is distill.runs'.
"""
