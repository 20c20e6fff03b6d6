"""Data loading, metrics (accuracy, fidelity, perplexity), latency and gates."""
