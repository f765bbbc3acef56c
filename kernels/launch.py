"""Launching a Triton kernel with less host time than kernel[grid](...).

On every call Triton's launch path (JITFunction.run) works out each argument's specialisation
(pointer dtype and 16-byte alignment, integer width and divisibility by 16) and a cache key from
them, then looks the compiled kernel up: ~15 us of host time a launch on this project's CPU
(triton 3.9), about as much as all the rest of a routed layer's launcher, and a routed layer's
launches are host-bound at training sizes. A Launcher remembers the compiled kernel Triton picked
under its own key, which tells apart at least every case Triton's specialisation does (dtypes,
alignment, integer classes, the constexprs and options, the device, Triton's debug and
instrumentation settings), and on a hit calls that kernel's launcher with the arguments Triton
would pass it. A caller that launches with the same constexprs and options many times prepares them
once (Launcher.prepare, then Launcher.launch), as the routed layer's launchers do (timed by
benchmarks/launcher_host_cost.py). tests/fast_launch_check.py checks both, kernel and arguments,
against Triton's own path. Triton launches the first call of every case itself, and every call
while a launch hook is set (profilers use them), or when the kernel's signature does not have the
form this relies on (constexprs last, no pre-run hooks), or when an argument is of another kind
than a tensor, an int or a float. CLEAR_FAST_DIRECT_LAUNCH=0 in the environment (read when a Launcher is
made, i.e. at import) sends every launch through Triton.
"""
import os

import torch

try:  # Triton internals, the same in 3.6 and 3.9; without them every launch goes through Triton
    from triton import knobs
    from triton.runtime import driver
except ImportError:  # pragma: no cover - older Triton
    knobs = driver = None

_I32, _I64 = 1 << 31, 1 << 63


class Launcher:
    """launcher(grid, *args, **meta) launches kernel[grid](*args, **meta): args the kernel's
    non-constexpr parameters in order, meta its constexprs and launch options by name."""

    def __init__(self, kernel):
        self.kernel = kernel
        # key -> (compiled kernel, its launch function, CUfunction, packed metadata);
        # the compiled kernel is held so that its module stays loaded (Triton unloads it on deletion)
        self._compiled = {}
        self._prepared_by_meta = {}  # _items(meta) -> Prepared, for calls with meta
        self._key_fns = {}  # argument types -> their key function (_key_function), False if none
        params = getattr(kernel, "params", None)
        self._direct = False
        self._constexpr_names = None
        if (knobs is None or params is None or getattr(kernel, "pre_run_hooks", None)
                or os.environ.get("CLEAR_FAST_DIRECT_LAUNCH", "1") == "0"):
            return
        runtime = [p for p in params if not p.is_constexpr]
        # Triton passes every parameter to the launcher in signature order, constexprs included:
        # the direct call appends them after args, right only when they come last
        if any(p.is_constexpr for p in params[:len(runtime)]):
            return
        self._specialised = tuple(not p.do_not_specialize for p in runtime)
        self._constexpr_names = tuple(p.name for p in params[len(runtime):])
        self._direct = True

    def __call__(self, grid, *args, **meta):
        items = _items(meta)
        prepared = self._prepared_by_meta.get(items)
        if prepared is None:
            prepared = self._prepared_by_meta[items] = self.prepare(**meta)
        self.launch(grid, args, prepared)

    def prepare(self, **meta):
        """The constexprs and launch options `meta` made ready for launch(): a caller that launches
        with the same ones many times prepares them once (a routed layer's launches do)."""
        return Prepared(meta, self._constexpr_names)

    def launch(self, grid, args, prepared):
        """kernel[grid](*args, **prepared.meta)."""
        key = self._key(args, prepared) if self._direct else None
        hit = None if key is None else self._compiled.get(key)
        if hit is None or _hooked():
            compiled = self.kernel[grid](*args, **prepared.meta)
            if key is not None and compiled is not None:
                run = compiled.run  # loads the module on first use
                self._compiled[key] = (compiled, run, compiled.function, compiled.packed_metadata)
            return
        _, run, function, packed_metadata = hit
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, driver.active.get_current_stream(key[0]),
            function, packed_metadata, None, None, None, *args, *prepared.constexprs)

    def _key(self, args, prepared):
        """A tuple that differs whenever Triton's specialisation of these arguments could, or None
        (an argument this does not classify, a count that does not match the signature, a constexpr
        left to its default). Its first item is the device."""
        if prepared.constexprs is None:
            return None
        types = tuple(map(type, args))
        key_of = self._key_fns.get(types)
        if key_of is None:
            key_of = self._key_fns[types] = _key_function(types, self._specialised)
        return key_of(args, prepared, types) if key_of else None


def _key_function(types, specialised):
    """The key of arguments of these types (exactly), as a function written out for them (a loop
    over the arguments testing each one's type cost 1.3 us more per launch of the routed backward's
    15 arguments, on this project's CPU). False when an argument's type is not classified (bool is
    not int here: Triton types it u1) or the count does not match the signature. What it keys on, per argument: a tensor's dtype and whether its address
    is a multiple of 16; an integer's width class (32, 64 bits or wider) and, unless the parameter is
    do_not_specialize, whether it is 1 and whether it is a multiple of 16; nothing of a float."""
    if len(types) != len(specialised):
        return False
    parts = []
    for i, (t, spec) in enumerate(zip(types, specialised)):
        a = f"args[{i}]"
        if t is int:
            width = f"(0 if {-_I32} <= {a} < {_I32} else 1 if {-_I64} <= {a} < {_I64} else 2)"
            parts.append(f"({width}, {a} == 1, {a} % 16 == 0)" if spec else width)
        elif issubclass(t, torch.Tensor):
            parts.append(f"{a}.dtype, {a}.data_ptr() % 16 == 0")
        elif t is not float:
            return False
    # what Triton adds to a launch's options from its settings, as of 3.9 (fpsan: 3.9 only)
    fpsan = ("knobs.compilation.fpsan_homomorphic_casts" if hasattr(knobs.compilation, "fpsan_homomorphic_casts")
             else "None")
    source = ("def key(args, prepared, types):\n"
              "    return (driver.active.get_current_device(), types, prepared, knobs.runtime.debug, "
              f"knobs.compilation.instrumentation_mode, {fpsan}, {', '.join(parts)})\n")
    namespace = {"driver": driver, "knobs": knobs}
    exec(source, namespace)  # noqa: S102 - source built above from types alone, as Triton builds its binders
    return namespace["key"]


class Prepared:
    """A launch's constexprs and options (meta), with what a Launcher's direct call needs of them:
    the constexpr values in signature order (None when one is missing: Triton fills in defaults) and
    a hash made once (part of every launch's cache key)."""
    __slots__ = ("meta", "constexprs", "_items", "_hash")

    def __init__(self, meta, constexpr_names):
        self.meta = meta
        self.constexprs = (None if constexpr_names is None or any(n not in meta for n in constexpr_names)
                           else tuple(meta[n] for n in constexpr_names))
        self._items = _items(meta)
        self._hash = hash(self._items)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, Prepared) and self._items == other._items)


def _items(meta):
    """meta's items with each value's type: 1, 1.0 and True are equal keys, not the same constexpr."""
    return tuple(meta.items()) + tuple(map(type, meta.values()))


def _hooked():
    """Whether Triton has a hook to call at a launch (profilers add them) or to key its cache on.
    Launch hooks are chains (HookChain, triton 3.6 and 3.9), empty unless something was added;
    without one, Triton's launchers take None for the hooks and their launch metadata."""
    rt = knobs.runtime
    return (_has_calls(rt.launch_enter_hook) or _has_calls(rt.launch_exit_hook)
            or getattr(rt, "add_stages_inspection_hook", None) is not None)


def _has_calls(hook):
    return hook is not None and bool(getattr(hook, "calls", True))  # a plain callable: yes
