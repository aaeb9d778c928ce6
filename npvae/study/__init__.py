"""Looking inside a trained VAE: :mod:`npvae.study.likelihood` (importance-weighted log-likelihood and
the IWAE objective) and :mod:`npvae.study.gradflow` (where a gradient comes from, and how noisy its
estimators are)."""
