"""Drills and contract checks that the tests and the scripts share; nothing in the product imports this package.

* :mod:`facedb.testing.integrity`: the deployment-shaped integrity drill (a real ``facedb serve`` with the
  console, CLI processes beside it, SIGKILLs; a ledger of every acknowledged operation checked at the end).
"""
