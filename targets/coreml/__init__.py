"""Core ML target (`.mlpackage`): lift-project layers as 1-bit palettized constants."""
