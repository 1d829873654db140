"""Sparse building blocks on MinkowskiEngine: sparsify/densify, kernel layouts, layers."""
