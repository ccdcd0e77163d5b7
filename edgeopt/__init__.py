"""edgeopt: hardware-aware deployment optimizer for ONNX models.

Importing this package is cheap: onnx, rich and every vendor SDK are imported
only by the functions that need them.
"""

__version__ = "0.1.0"
