"""Evaluation: log-likelihood scoring, multiple-choice benchmarks, perplexity."""
