"""camouflage-train: train and evaluate CAMOUFLaGE attribute-preserving image anonymizers."""

try:  # config resolvers matter only where Hydra/OmegaConf configs are used
    from camouflage_train.utils.resolvers import register as _register_resolvers
except ImportError:  # pragma: no cover - library use without omegaconf
    pass
else:
    _register_resolvers()
