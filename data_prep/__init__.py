"""Offline converters: raw datasets -> FFCV .beton files (+ manifest)."""
