"""The installed commands (``pip install .``), one module each, absl flags throughout:
``sh2-train`` (``train.py``), ``sh2-generate`` (``generate.py``), ``sh2-convert``
(``convert.py``), ``sh2-score`` (``score.py``) and ``sh2-embed`` (``embed.py``); ``launch.py``
is how each one starts. A checkout's ``train.py`` and ``generate.py`` and
``python -m sh2_jax.convert`` run the same modules."""
