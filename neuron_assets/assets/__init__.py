"""Software-defined assets, one module per stage; thin: read inputs, call method/, write tables."""
