"""Evaluation: generated tasks, needle runs, benchmark suites and their contenders (peers included), reports,
fidelity, and the diagnostic. Builds on the runtime; the command line builds on it."""
