"""Serialisation formats used by rayhooks (TensorBoard event files and summaries)."""
