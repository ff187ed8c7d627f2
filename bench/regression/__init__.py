"""The regression gate: the exact tokens/GMACs snapshot (`snapshot`) and the speedup gate (`speed_gate`)."""
