"""Pacifica Cartd: stage files from the Pacifica archive interface and serve them as one tar."""
