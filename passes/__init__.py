"""graphopt's built-in passes, one module per pass family.

They register through the ``graphopt.passes`` entry points in graphopt's
``pyproject.toml``, exactly like a third-party plugin; the core never imports them.
"""
