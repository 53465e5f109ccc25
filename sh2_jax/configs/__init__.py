"""The ml_collections training configs, one per model preset (``base.make_config``). Train with
``--config=configs/<name>.py`` from a checkout (the top-level ``configs/`` files re-export these)
or ``--config=<site-packages>/sh2_jax/configs/<name>.py`` after ``pip install``."""
