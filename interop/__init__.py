"""Adapters that let other tools open tomolive's results (napari) and that segment other tools'
projects in place (copick)."""
