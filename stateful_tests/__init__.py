"""Hypothesis rule-based machines driving refcache and the abstract model in lockstep."""
