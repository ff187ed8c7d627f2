"""Built-in methods, one module each, found through the `tokenbench.methods` entry points like any plugin.

The package is callable: `tokenbench.methods()` is the table of every registered method, plugins included.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self):
        from tokenbench.api import method_table

        return method_table()


sys.modules[__name__].__class__ = _CallablePackage
