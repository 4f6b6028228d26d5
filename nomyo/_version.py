"""The version of nomyo, in one place: the package metadata reads it, and the build stamps it
into every compiled module, whose stamp is checked at import (a stale build is reported)."""

__version__ = "0.4.0.dev0"
