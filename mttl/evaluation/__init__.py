"""Scoring: rank classification, generation metrics (Rouge-L, exact match), aggregation, `mttl evaluate`."""
