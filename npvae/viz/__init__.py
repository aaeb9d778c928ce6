"""Pictures: :mod:`npvae.viz.plots` draws arrays and knows no models; :mod:`npvae.viz.figures` runs a
model to get those arrays. Both need matplotlib (the ``plot`` extra), imported when a picture is drawn."""
