"""Small stand-ins for models that cannot be downloaded here, in the real formats, for demos and tests.

* :mod:`.face_pack`: an insightface-layout ONNX pack (detector, gender/age, 112x112 recogniser), built on
  first use into the cache by :func:`.face_pack.tiny_face_pack` (configs: ``faces=tiny``, ``recognisers=tiny``);
* :mod:`.features`: a fixed random conv feature extractor for FID/KID (``experiment=eval_demo``).

The tiny and SD 1.5-shaped diffusers models are ``preset:`` sources of the backbone loader
(:mod:`camouflage_train.models.presets`), since benchmarks use them as models, not only tests.
Numbers computed with any of these exercise the code paths; they say nothing about a method.
"""
