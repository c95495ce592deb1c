"""The codec's errors, below the modules that raise them (bitstream, range_coding, caption_coding).

Everything a decoder can be handed that it cannot read raises a `BitstreamError` (a ValueError)
with a message saying why; entropy-coded data that does not decode raises its subclass
`CodingError`, so a caller catches either with `except BitstreamError`.
"""


class BitstreamError(ValueError):
    """A bitstream that is not valid for this decoder (with a message saying why)."""


class CodingError(BitstreamError):
    """Entropy-coded data that cannot be decoded (corrupted or truncated)."""
