"""headbench: extract frozen CNN features once, then compare classifier heads in seconds."""

__version__ = "0.2.0"


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Versions of headbench, Python and the installed ``packages`` (missing ones are left out), for provenance."""
    import importlib.metadata as md
    import sys

    out = {"headbench": __version__, "python": sys.version.split()[0]}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
