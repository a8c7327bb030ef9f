"""Experiments: the notebook's reproduction and the benefits lab."""
