"""Invariants declared once (registry), proved with Z3 over bounded symbolic trees, checked
with CrossHair on the pure helpers, and documented for reviewers (DESIGN §3, §5).

Modules: `registry` (each invariant: statement, predicate, Z3 encoding, bug classes),
`symbolic` (state over a backend: Z3 terms or plain Python values), `transitions` (each cache
operation as a relation), `encodings` (invariant formulas and strengthening lemmas), `prove`
(inductive checks, table, counterexamples), `replay` (counterexample -> concrete HiCache
scenario), `drift` (concrete steps of the stateful suite against the relation),
`crosshair_checks` (contracts of refcache.pages), `docs` (reviewer pages).
"""
