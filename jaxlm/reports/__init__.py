"""Reports on finished runs: reading their metrics (runs.py) and drawing comparisons (plots.py),
shared by tools/plot_runs.py, compute_to_target.py, metric_at.py, fit_mixture_law.py and
reproduce.py."""
