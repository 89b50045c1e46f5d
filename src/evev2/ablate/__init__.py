"""`evev2 ablate`: the paper's architecture study (EVEv1.0 / v1.2 / v1.5 / v2.0) in miniature, on the demo's world."""
