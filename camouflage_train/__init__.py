"""camouflage-train: train and evaluate CAMOUFLaGE attribute-preserving image anonymizers."""
