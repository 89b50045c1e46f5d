"""Benchmark scoring for EVEv2 models: official per-benchmark metrics, file readers and the task registry.

Scoring needs no model: `evev2 eval score` turns a predictions JSONL plus the benchmark's annotation file into the
numbers the community reports, so our results can sit next to the EVEv2 paper's Table 2.
"""
