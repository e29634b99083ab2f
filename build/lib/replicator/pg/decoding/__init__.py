"""Pure decoders of logical decoding output plugins: bytes in, changes out, no I/O."""
