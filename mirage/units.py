"""Durations and sizes as a person reads them in a message or a progress line."""


def format_duration(seconds):
    """45 -> '45s', 250 -> '4m10s', 7500 -> '2h05m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_size(num_bytes):
    """A size in bytes for a message: '512 B', '28.67 kB', '1.50 MB', '12.35 GB' (SI units,
    as disk tools report them; a unit small enough that a small size is not '0.00 GB')."""
    if num_bytes < 1000:
        return f"{int(num_bytes)} B"
    for unit, size in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if round(num_bytes / size, 2) < 1000:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes / 1e12:.2f} TB"
