"""HTTP byte ranges: a `Range` header read against the size of the tar it asks for (RFC 9110)."""
from __future__ import annotations

from typing import Optional, Tuple


def parse_range(header: Optional[str], size: int) -> Optional[Tuple[int, int]]:
    """Parse a single `bytes=` Range into (start, end exclusive); None means the whole body.

    Several ranges, or a header that is not a byte range, are answered with the whole body
    (allowed by RFC 9110). A range that starts past the end raises ValueError (416).
    """
    if not header or not header.startswith('bytes=') or ',' in header:
        return None
    first, _, last = header[len('bytes='):].strip().partition('-')
    try:
        if first == '':
            suffix = int(last)
            if suffix <= 0:
                raise ValueError('empty suffix range')
            return (max(size - suffix, 0), size)
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size or start < 0:
        raise ValueError(f'range starts at {start}, the tar has {size} bytes')
    if end <= start:
        return None
    return (start, min(end, size))
