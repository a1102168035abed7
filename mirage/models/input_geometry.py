"""An encoder's input geometry: sizes as (height, width) and the patch sizes they must fit."""


def pair(size):
    """``size`` as (h, w) ints: an int is square, a sequence gives its first two items."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def nearest_valid(input_size, patch_size):
    """The multiples of the patch size nearest to each side of ``input_size`` (both (h, w)),
    in words, e.g. '1022 or 1036', or 'height 1022 or 1036, width 504 or 518' when they differ."""
    def around(size, patch):
        below = size - size % patch
        return (f"{below} or {below + patch}" if below and size % patch
                else str(below or patch))
    (h, w), (ph, pw) = input_size, patch_size
    if (h, ph) == (w, pw):
        return around(h, ph)
    return f"height {around(h, ph)}, width {around(w, pw)}"
