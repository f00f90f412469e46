"""Quark's data pipeline: sources (local files, the offline corpora of `offline`, HF datasets), mixtures, evaluation
deduplication, and `quark prepare`, which writes the token shards training reads (`quark.data.loader`)."""
