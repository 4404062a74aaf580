"""Retrieval index over memory shards: a plain FAISS shard and its Ray actor."""
