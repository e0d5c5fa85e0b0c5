"""Converters from public datasets to the dscovid raw format, and the synthetic phantom generator."""
