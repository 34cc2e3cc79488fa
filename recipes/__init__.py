"""Shipped recipes (YAML), installed as ``attnsurgery.recipes``; one folder per surgery."""
