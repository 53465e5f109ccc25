"""The ml_collections training configs, one per model preset (``base.make_config``). Train with
``sh2-train --config=<name>`` (the name of a file here), ``--config=configs/<name>.py`` from a
checkout (the top-level ``configs/`` files re-export these), or the path of any config file."""
