"""Lean runtime: config, manifest, schedule, policies, decoder and backends. Imports no torch at module level."""
