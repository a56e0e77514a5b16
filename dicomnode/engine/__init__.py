"""The deep-learning core: networks, diffusion, model cards, preprocessing and the synthesiser."""
