"""Accuracy and speed evaluation on GSM8K-style data: not part of the runtime a deployment needs."""
