"""The trained tiny language models shipped with spac (default MoE and its dense draft).

``recipe`` (shapes, training settings), ``corpus`` and ``data`` need only numpy; ``model``,
``train``, ``export`` and ``verify`` need PyTorch, which only the training script and optional
tests use: the runtime never imports them.
"""
