"""Operations on top of the gallery: the audit trail, unknown visitors, clustering, duplicates, contact sheets,
backup, re-embedding, API keys and webhooks."""
