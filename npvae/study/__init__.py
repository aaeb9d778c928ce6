"""Looking inside trained models: the numbers and arrays behind npvae's reports and pictures.

- :mod:`npvae.study.likelihood`: importance-weighted estimates of log p(x) (``npvae evaluate --iw-samples``).
- :mod:`npvae.study.gradflow`: where a VAE's gradient comes from (the reconstruction/KL split), and
  how noisy the gradient estimators of :mod:`npvae.objectives.estimators` are (``npvae grads``).
- :mod:`npvae.study.statistics`: PCA of the codes, active units, standard-normal quantiles and the
  latent grid on them: what the latent, KL and manifold pictures of :mod:`npvae.viz` draw.
- :mod:`npvae.study.regularity`: how sparse and how contractive an autoencoder's code is, and its
  first layer's filters.
- :mod:`npvae.study.cleaning`: how much a model trained on (noisy, clean) pairs cleans.
- :mod:`npvae.study.estimators`: the estimator registry under its older name (it lives in
  :mod:`npvae.objectives.estimators`).

The study tools sit above :mod:`npvae.objectives` and the models, whose public methods they call,
and below :mod:`npvae.viz`, which draws what they compute.
"""
