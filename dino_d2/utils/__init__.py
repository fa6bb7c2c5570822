"""Process-level helpers that every part of a job shares: writing into the output folder so
that a failed write never damages a file (:mod:`dino_d2.utils.atomic`), the CPUs this
process gets and how busy other processes keep them (:mod:`dino_d2.utils.cpus`), names a
package exports but imports on first use (:mod:`dino_d2.utils.lazy`) and how the C allocator
treats large freed blocks in inference and training processes (:mod:`dino_d2.utils.allocator`)."""

from .atomic import OutputWriteError, append_or_roll_back, atomic_write, write_error, write_json

__all__ = ["OutputWriteError", "atomic_write", "append_or_roll_back", "write_error", "write_json"]
