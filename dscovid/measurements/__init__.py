"""Measurements shared by several stages: ``findings`` (the lesion measurements behind the paper's four findings,
used by the analysis, the fingerprint, the per-case lesion report and the synthetic generator's check)."""
