"""The package version, in a module of its own so every layer can name it without importing the
package's lazy public surface (`reb_dist/__init__.py` sits on top of every layer)."""

__version__ = "0.1.0"
