"""Flower ServerApp component of mosaic-flwr."""
