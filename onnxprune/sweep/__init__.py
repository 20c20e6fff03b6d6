"""Sweeps: many recipes on one model, measured on held-out data, with a Pareto front.

    grid.py       candidates from comma lists or a grid file
    candidate.py  one candidate (prune, measure) and the work candidates share
    executors.py  this process, a local process pool, or tasks on a Ray cluster
    pareto.py     the front and the --max-drop choice
    output.py     table, JSON, CSV, pareto.png
    tracking.py   MLflow runs (sweep, prune, eval)
    run.py        the driver: run_sweep
"""

from onnxprune.sweep.candidate import Measure
from onnxprune.sweep.run import SweepResult, run_sweep

__all__ = ["Measure", "SweepResult", "run_sweep"]
