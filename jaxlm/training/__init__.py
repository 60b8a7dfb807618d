"""The run and its loop: stages and how one hands over to the next, the pre-flight checks and
plan, the trainer, the jitted step, what happens every so many steps, the compute ledger,
metrics, preemption, and a finished run read back for evaluation and sampling (saved_run.py)."""
