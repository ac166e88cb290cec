"""Adapters that let other tools open tomolive's results (napari; more to come: copick)."""
