"""Judging samples: a classifier judge, Fréchet distances, the evaluation report."""
