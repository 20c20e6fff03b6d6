"""Latency-aware pruning: measured latency tables per channel group, and the plan that meets a latency budget."""
