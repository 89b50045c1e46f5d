"""`evev2 demo`: the whole EVEv2 recipe in miniature on the synthetic world, end to end on a laptop CPU."""
