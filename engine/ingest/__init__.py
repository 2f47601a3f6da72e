"""Lead intake: ingest, the micro-batcher, the sync waterfall."""
