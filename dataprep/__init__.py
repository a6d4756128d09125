"""Data stage: source files → dedup → GPT-2 tokens → uint16 shards with a manifest (Ray tasks)."""
