"""Theory checking: exact finite-MDP versions of the paper's updates, against which its claims are tested.

:mod:`dromo_ray.theory.tabular` is tabular DROMO (Lemma 4.1's closed-form update, Eq. 15; the exact argmin of
Eq. 13; Theorem 4.4 and Corollary 4.3 checked against Q^pi from a linear solve). It may import ``core``
(numpy + torch only); nothing in the package imports it, only the tests.
"""
