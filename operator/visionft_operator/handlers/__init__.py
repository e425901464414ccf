"""One module per event source; ``main.py`` registers them with Kopf."""
