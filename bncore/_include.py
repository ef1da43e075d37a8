"""Where the C headers are (get_include)."""
import os

__all__ = ["get_include"]


def get_include() -> str:
    """Return the folder holding bncore's C headers (``bncore.h`` and its parts).

    A C or C++ program can use bncore's kernels without Python: compile it
    with this folder on the include path and define ``BNCORE_IMPLEMENTATION``
    in exactly one of its source files before including ``bncore.h``.

    Returns
    -------
    str
        The absolute path of the folder: ``bncore/include`` inside an
        installed package (wheels ship the headers), or the ``include``
        folder of the source checkout for an in-place or editable build.

    Raises
    ------
    FileNotFoundError
        If neither folder holds ``bncore.h`` (a broken installation).

    Examples
    --------
    >>> import os
    >>> import bncore
    >>> os.path.isfile(os.path.join(bncore.get_include(), "bncore.h"))
    True

    From a shell::

        cc -O3 -fopenmp -I "$(python -c 'import bncore; print(bncore.get_include())')" app.c -lm
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "include"), os.path.join(os.path.dirname(here), "include")):
        if os.path.isfile(os.path.join(folder, "bncore.h")):
            return folder
    raise FileNotFoundError(
        f"bncore's C headers: expected bncore.h in {os.path.join(here, 'include')}, got none; "
        "reinstall bncore")
