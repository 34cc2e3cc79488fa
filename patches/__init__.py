"""Built-in surgeries: one folder each (``config.py`` with the arguments, ``surgery.py`` with the stages).

Installed as ``attnsurgery.patches``; the registry finds folders by name and imports them lazily.
"""
