"""camouflage-train: train and evaluate CAMOUFLaGE attribute-preserving image anonymizers."""

from camouflage_train.utils.resolvers import register as _register_resolvers

_register_resolvers()
