"""The conformance suite every registered method is held to, plugins included.

Run it on the methods installed in an environment with `pytest --pyargs tokenbench.testing`
(add `-k NAME` for one method).
"""
