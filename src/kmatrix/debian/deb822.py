"""The deb822 format (Packages, Release, apt ``.sources``): one pure parser shared by them all."""

from __future__ import annotations


def parse_deb822(text: str, origin: str = "<text>") -> list[dict[str, str]]:
    """Parse deb822 stanzas (Packages, Release, .sources). Continuation lines join with '\\n'.

    Comment lines starting with '#' are dropped. ``origin`` names the file in errors.
    """
    stanzas: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last: str | None = None
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur, last = {}, None
            continue
        if line[0] == "#":
            continue
        if line[0] in " \t":
            if last is None:
                raise ValueError(f"{origin}:{lineno}: continuation line without a field")
            cur[last] += "\n" + line.strip()
            continue
        key, sep, value = line.partition(":")
        if not sep or not key or " " in key:
            raise ValueError(f"{origin}:{lineno}: not a 'Field: value' line: {line[:60]!r}")
        last = key
        cur[key] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas
