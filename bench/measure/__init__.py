"""Measuring one configuration: accuracy, GMACs, throughput, latency (`metrics`), matched budgets (`budget`),
paired statistics (`stats`), and the results row with its provenance (`results`)."""
