"""dfield: distilled feature fields on a CPU.

The public API is re-exported lazily from the submodules so `import dfield` stays cheap for the CLI.
"""

__version__ = "0.1.0"
