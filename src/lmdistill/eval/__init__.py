"""Evaluation of a distilled student: metrics, speed, quality samples and the HTML report.

Modules: `metrics` (perplexity, agreement/KL, ROUGE-L, exact match, greedy generation), `speed` (size and
tokens/s), `evaluate` (all of it for several model roles -> metrics.json), `samples` (teacher vs student
generations -> samples.jsonl, logs, TensorBoard), `run_files` and `plots` (what the report reads and draws),
`report` (one self-contained report.html).
"""
