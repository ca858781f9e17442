"""Streaming a converted dataset through LitData (the :class:`~diffusion_pl.data.Streaming` source): what a
conversion records (:mod:`~diffusion_pl.data.streaming.metadata`, without LitData) and reading it back
(:mod:`~diffusion_pl.data.streaming.dataset`, which imports LitData). Converting: :mod:`diffusion_pl.data.convert`."""
