"""refquant's version, in a module of its own so that any layer can name it without importing the
package (the checkpoint's state file records which refquant wrote it)."""

__version__ = "0.2.0.dev0"
