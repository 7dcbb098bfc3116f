"""Worked examples of bilevelkit outside MRI."""
