"""The codec: bitstream container (bitstream.py), entropy coding of index grids (range_coding.py) and
their errors (errors.py)."""
from perco_jax.codec.bitstream import Header, check_fingerprint, fingerprint, pack, unpack
from perco_jax.codec.errors import BitstreamError, CodingError
from perco_jax.codec.range_coding import (Decoder, decode_uniform, encode_groups, encode_uniform,
                                          quantize_probabilities)

__all__ = ["BitstreamError", "CodingError", "Decoder", "Header", "check_fingerprint", "decode_uniform",
           "encode_groups", "encode_uniform", "fingerprint", "pack", "quantize_probabilities", "unpack"]
