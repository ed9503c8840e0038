"""Metal kernel sources (and their CUDA twins), shipped in the wheel as package data."""
