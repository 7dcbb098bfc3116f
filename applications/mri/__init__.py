"""MRI reconstruction: the first full application of bilevelkit."""
