"""The gallery: the store (the truth), the derived index and its upkeep, the query engine and the decision rules."""
