"""Evaluation harness: per-lesion and per-patient statistics from tables only (no torch)."""
