"""Flower ClientApp component of mosaic-flwr."""
