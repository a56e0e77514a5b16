"""The inference core: networks, diffusion, model cards, the model grid and preprocessing (run in
the inference process; the daemon's receiving process never imports it)."""
