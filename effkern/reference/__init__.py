"""Plain PyTorch implementations of every op: the ``reference`` backend and the
fallback when the compiled extension is missing.  (The float64 test oracles in
tests/oracles.py are written independently of these.)"""
