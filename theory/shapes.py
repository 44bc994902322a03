"""Shape checks at the entry points of theory/ and sim.estimators (as rlax does with chex asserts).

A legend names each dimension of an argument, e.g. ``"... P K"`` (DESIGN.md §8 shape legends):
named dimensions must agree across the arguments of one call, ``...`` stands for leading batch
dimensions that must broadcast against each other, and a number is a fixed size. A mismatch
raises ValueError naming the function, the argument and the dimension, instead of letting
broadcasting turn a [P, 1] sigma into a [P, P, G] result.
"""

from __future__ import annotations

def _broadcast(shapes: list[tuple[int, ...]]) -> bool:
    """True when the shapes broadcast (numpy rules, right-aligned; 1 stretches). Pure Python: a few
    microseconds, where torch.broadcast_shapes costs about 80 here (the checks run every step)."""
    for i in range(1, max((len(s) for s in shapes), default=0) + 1):
        sizes = {s[-i] for s in shapes if len(s) >= i and s[-i] != 1}
        if len(sizes) > 1:
            return False
    return True


_CHECKED: dict = {}  # (fn, (name, legend, shape) per argument) -> sizes: each combination is checked once


def check_shapes(fn: str, **args) -> dict[str, int]:
    """Check ``name=(tensor or None, "... P K")`` pairs; return the sizes bound to each letter.

    Rule: for every argument, shape = leading + named with len(named) = the legend's letters;
    a letter binds one size for the whole call (size_X(arg_a) = size_X(arg_b)); the leading
    parts broadcast (numpy / torch rules). None arguments are skipped. Each combination of
    shapes is checked once and remembered (the engine calls this every step)."""
    key = (fn, tuple((name, legend, None if x is None else tuple(x.shape)) for name, (x, legend) in args.items()))
    sizes = _CHECKED.get(key)
    if sizes is None:
        sizes = _check_shapes(fn, **args)
        if len(_CHECKED) < 100_000:
            _CHECKED[key] = sizes
    return dict(sizes)


def _check_shapes(fn: str, **args) -> dict[str, int]:
    """The check of ``check_shapes``, uncached."""
    sizes: dict[str, tuple[int, str]] = {}
    leading = []
    for arg, (x, legend) in args.items():
        if x is None:
            continue
        names = legend.split()
        batched = bool(names) and names[0] == "..."
        named = names[1:] if batched else names
        shape = tuple(x.shape)
        if len(shape) < len(named) or (not batched and len(shape) != len(named)):
            raise ValueError(f"{fn}: {arg} must have shape [{', '.join(names)}], got {list(shape)}")
        tail = shape[len(shape) - len(named):]
        for letter, size in zip(named, tail):
            if letter.isdigit():
                if size != int(letter):
                    raise ValueError(f"{fn}: {arg} must have shape [{', '.join(names)}], got {list(shape)}")
                continue
            if letter in sizes and sizes[letter][0] != size:
                first_size, first_arg = sizes[letter]
                raise ValueError(f"{fn}: {arg} has {letter} = {size} (shape {list(shape)}) but {first_arg} "
                                 f"has {letter} = {first_size}")
            sizes.setdefault(letter, (size, arg))
        leading.append(shape[:len(shape) - len(named)])
    if len(leading) > 1 and not _broadcast(leading):
        raise ValueError(f"{fn}: leading (batch) dimensions {[list(s) for s in leading]} do not broadcast "
                         f"({', '.join(args)})")
    return {k: v for k, (v, _) in sizes.items()}
