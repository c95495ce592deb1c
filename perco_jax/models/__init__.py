"""Pure Flax Linen networks (no I/O, no flags): one file per network."""
