"""graphopt's built-in targets. They register through the ``graphopt.targets`` entry
points in graphopt's ``pyproject.toml``, exactly like a third-party plugin."""
